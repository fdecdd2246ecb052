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

# name -> (folders under RAW it reads, where users get it; docs/data.md has licences and the layout)
ORIGINS = {
    "meld": (["meld"], "MELD: github.com/declare-lab/MELD (train/dev/test_sent_emo.csv)"),
    "mosi": (
        ["cmu_mosi_text"],
        "CMU-MOSI transcripts with scores as label.csv (CMU-MultimodalSDK; e.g. jiangbing22/MMCPanda)",
    ),
    "ckplus": (
        ["ck_plus_48", "ckplus_facs_netfacs"],
        "CK+ 48x48 crops as CK+48/<label>/*.png (CK+ licence from its owners) and NetFACS's "
        "emotions_set_ckplus_aus.csv (github.com/NetFACS/NetFACS)",
    ),
    "fer2013": (
        ["fer2013_subset"],
        "FER2013 PrivateTest as test/<label>/*.jpg (Kaggle 'Challenges in Representation Learning')",
    ),
    "emer": (
        ["emer_affectgpt"],
        "EMER from github.com/zeroQiaoba/AffectGPT (dataset-v1/gt-eng.csv, dataset-v2/final-EMER-reason.csv)",
    ),
    "ecf1": (["ecf1_mecpe"], "ECF 1.0 from github.com/NUSTM/MECPE (train/dev/test.txt)"),
    "ecf2": (["ecf2_semeval2024_ecac"], "ECF 2.0 from github.com/NUSTM/SemEval-2024_ECAC (Subtask_2_test.json)"),
}


def missing_sources(raw, names: list[str]) -> list[str]:
    """One line per source whose folder is not under `raw`: what it is and where to get it."""
    from pathlib import Path

    return [
        f"{name}: {Path(raw) / folder} is missing; get it from {ORIGINS[name][1]}"
        for name in names
        for folder in ORIGINS[name][0]
        if not (Path(raw) / folder).is_dir()
    ]


__all__ = ["SOURCES", "ORIGINS", "BuildReport", "SourceError", "missing_sources"]
