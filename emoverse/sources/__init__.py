"""One reader per raw source. Each yields AMT Records and reports what it dropped, and why."""

from emoverse.sources.base import BuildReport, SourceError
from emoverse.sources.ckplus import read_ckplus
from emoverse.sources.ecf import read_ecf1, read_ecf2
from emoverse.sources.emer import read_emer
from emoverse.sources.fer2013 import read_fer2013
from emoverse.sources.meld import read_meld
from emoverse.sources.mosi import read_mosi

# name -> reader(raw_dir, report) ; order is the build order
SOURCES = {
    "meld": read_meld,
    "mosi": read_mosi,
    "ckplus": read_ckplus,
    "fer2013": read_fer2013,
    "emer": read_emer,
    "ecf1": read_ecf1,
    "ecf2": read_ecf2,
}

__all__ = ["SOURCES", "BuildReport", "SourceError"]
