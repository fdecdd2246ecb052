import json

import pytest

from emoverse.artifacts import ArtifactError, atomic_dir, cpu_name, verify, write_manifest


def _make(tmp_path):
    with atomic_dir(tmp_path / "art") as d:
        (d / "a.txt").write_text("hello")
        (d / "sub").mkdir()
        (d / "sub" / "b.bin").write_bytes(b"\x00\x01")
        write_manifest(d, kind="test", producer={"stage": "unit"})
    return tmp_path / "art"


def test_manifest_verifies(tmp_path):
    art = _make(tmp_path)
    m = verify(art, kind="test")
    assert set(m["files"]) == {"a.txt", "sub/b.bin"}
    assert "torch" in m["libraries"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "art") as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "tamper,msg",
    [
        (lambda a: (a / "a.txt").write_text("changed"), "does not match its manifest"),
        (lambda a: (a / "extra.txt").write_text("x"), "not in the manifest"),
        (lambda a: (a / "sub" / "b.bin").unlink(), "missing"),
        (lambda a: (a / "manifest.json").unlink(), "no manifest.json"),
    ],
)
def test_tampering_is_detected(tmp_path, tamper, msg):
    art = _make(tmp_path)
    tamper(art)
    with pytest.raises(ArtifactError, match=msg):
        verify(art)


def test_manifest_paths_cannot_escape(tmp_path):
    art = _make(tmp_path)
    (tmp_path / "outside.txt").write_text("x")
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["../outside.txt"] = "0" * 64
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="escapes"):
        verify(art)


def test_wrong_kind(tmp_path):
    with pytest.raises(ArtifactError, match="expected 'emoverse-model'"):
        verify(_make(tmp_path), kind="emoverse-model")


def test_atomic_write_to_a_device_writes_through_it(tmp_path):
    """`--out /dev/null` must not rename a temp file over the device (it did once, here, by hand)."""
    import os
    import stat
    import threading

    from emoverse.artifacts import atomic_write_json

    atomic_write_json(os.devnull, {"a": 1})
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    atomic_write_json(fifo, {"b": 2})
    reader.join(timeout=10)
    assert got and json.loads(got[0]) == {"b": 2} and stat.S_ISFIFO(os.stat(fifo).st_mode)
    atomic_write_json(tmp_path / "f.json", {"c": 3})  # a plain file still goes through the rename
    assert json.loads((tmp_path / "f.json").read_text()) == {"c": 3}


def test_cpu_name_names_the_kernel_flags_that_tell_two_cpus_of_one_name_apart(tmp_path):
    # two "AMD EPYC" seen here: AVX-512 with BF16 and VNNI, and AVX2 only; their timings and integer kernels differ
    zen4, zen3, arm = (tmp_path / n for n in ("zen4", "zen3", "arm"))
    zen4.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 avx512f avx512_vnni avx512_bf16\n"
        "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 avx512f avx512_vnni avx512_bf16\n"
    )
    zen3.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert cpu_name(zen4) == "AMD EPYC (avx2, avx512f, avx512_vnni, avx512_bf16)"
    assert cpu_name(zen3) == "AMD EPYC (avx2)"
    assert cpu_name(arm).endswith("(asimddp)")
    assert cpu_name(tmp_path / "absent")  # no /proc/cpuinfo: the platform's name
