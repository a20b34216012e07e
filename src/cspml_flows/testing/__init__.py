"""Test helpers for the HPC path without HPC software: a stand-in VASP executable
(``python -m cspml_flows.testing.fake_vasp``) and synthetic POTCAR folders. Nothing here is physics:
energies come from ASE EMT (or CHGNet), and the POTCARs hold headers only."""
