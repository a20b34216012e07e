"""A campaign's workdir: who it belongs to (``<workdir>/.campaign.json``, name and campaign file) and the lock
that keeps two runs of one campaign from overlapping (``<workdir>/.campaign.lock``, an exclusive ``flock``).

A workdir belongs to the campaign that first ran in it: another campaign pointed at it is refused before
anything is written; a second run of the same campaign stops at once, naming the lock and its holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from cspml_flows.campaign.config import CampaignConfig, CampaignError
from cspml_flows.core.config import check_output_path, excerpt_text
from cspml_flows.core.safeio import atomic_open

LOCK_FILE = ".campaign.lock"
OWNER_FILE = ".campaign.json"


def _describe(name: str, source: str | None) -> str:
    """``campaign NAME (FILE)``."""
    return f"campaign {name}" + (f" ({source})" if source else "")


def workdir_owner(workdir: Path) -> tuple[str, str | None] | None:
    """The (name, campaign file) of the campaign a workdir belongs to: its ``.campaign.json``, else the
    ``summary.json`` an earlier version wrote; None for a workdir no campaign has used."""
    for name, key in ((OWNER_FILE, "name"), ("summary.json", "campaign")):
        path = workdir / name
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get(key), str):
            raise CampaignError(
                f"{path} is not a campaign's record: check that workdir {workdir} is the campaign's, then delete it"
            )
        source = doc.get("config") if name == OWNER_FILE else None
        return excerpt_text(doc[key], 100), excerpt_text(source, 300) if isinstance(source, str) else None
    return None


def check_workdir(cfg: CampaignConfig, claim: bool = False) -> Path:
    """CampaignError when the campaign's workdir belongs to another campaign, or cannot be written (a file, a
    broken link, no permission). ``claim``: record this campaign as its owner (``.campaign.json``)."""
    workdir = cfg.workdir_path()
    check_output_path(workdir, label=f"campaign {cfg.name}'s workdir")
    owner = workdir_owner(workdir)
    source = str(Path(cfg.source).resolve()) if cfg.source else None
    if owner is not None and owner[0] != cfg.name:
        raise CampaignError(
            f"workdir {workdir} belongs to {_describe(*owner)}; {_describe(cfg.name, source)} stops without writing "
            f"anything: give it another 'workdir', or delete {workdir} if {owner[0]}'s results are no longer wanted"
        )
    if claim and (owner is None or (source and owner[1] != source)):
        workdir.mkdir(parents=True, exist_ok=True)
        with atomic_open(workdir / OWNER_FILE) as fh:
            json.dump({"name": cfg.name, "kind": cfg.kind, "config": source}, fh)
    return workdir


@contextmanager
def campaign_lock(cfg: CampaignConfig) -> Iterator[Path]:
    """Hold ``<workdir>/.campaign.lock`` (an exclusive ``flock``, released when the process ends, even if it
    is killed) and claim the workdir for the campaign; CampaignError names the holder when another run has
    it, or the campaign the workdir belongs to."""
    workdir = check_workdir(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            raise CampaignError(
                f"campaign {cfg.name} is already running ({holder}; lock {path}): this run stops, nothing was done"
            ) from None
        check_workdir(cfg, claim=True)  # again under the lock: another campaign may have claimed it meanwhile
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC".encode(),
            0,
        )
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
