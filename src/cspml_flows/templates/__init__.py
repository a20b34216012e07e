"""The template database: document schema, maggma-backed store and importers."""

from cspml_flows.templates.schema import TemplateDoc, template_doc_from_structure
from cspml_flows.templates.store import TemplateStore

__all__ = ["TemplateDoc", "TemplateStore", "template_doc_from_structure"]
