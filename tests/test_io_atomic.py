"""An adapter folder is saved as a unit: kills, failing writers, a full disk and concurrent
savers leave the previous adapter or the new one; permissions follow the umask; PaCA and
PEFT folders cannot clobber each other; damaged files are reported naming the file.

Each guarantee of docs/adapters.md ("Save and load", "Export") has a test here or in
tests/test_io.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import paca
import paca.io as pio
from paca import atomic
from paca.export import LORA_CONFIG_NAME, LORA_STORE, LORA_WEIGHTS_NAME

HERE = Path(__file__).resolve().parent
FILES = [pio.WEIGHTS_NAME, pio.CONFIG_NAME]


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 6))


def adapter(value: float, r: int = 2) -> paca.PacaModel:
    model = paca.wrap(base(), paca.PacaConfig(r=r, target_modules=["0", "2"], seed=3))
    with torch.no_grad():
        for _, layer in model.paca_layers():
            layer.paca_delta["default"].fill_(value)
    return model


def deltas(model: paca.PacaModel) -> dict[str, torch.Tensor]:
    return {n: layer.paca_delta["default"].detach().clone() for n, layer in model.paca_layers()}


def loads_as(folder: Path, model: paca.PacaModel) -> bool:
    loaded = paca.load(base(), folder)
    got, want = deltas(loaded), deltas(model)
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def store_entries(folder: Path, store: str = pio.STORE) -> list[str]:
    """What the generation store holds besides the committed generation and the lock."""
    s = folder / store
    keep = {"current", "lock", os.readlink(s / "current")}
    return sorted(p.name for p in s.iterdir() if p.name not in keep)


# ----------------------------------------------------------------- kills and concurrency
@pytest.fixture(scope="module")
def trials(tmp_path_factory) -> dict:
    """One subprocess runs every fault trial (see tests/atomic_worker.py)."""
    work = tmp_path_factory.mktemp("trials")
    out = work / "report.json"
    subprocess.run(
        [sys.executable, str(HERE / "atomic_worker.py"), str(out), str(work), "--trials", "20"],
        check=True,
        timeout=240,
        cwd=HERE.parent,
    )
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kill", "kill_export"])
def test_sigkill_at_random_moments_leaves_the_old_or_the_new_adapter(trials, kind):
    report = trials[kind]
    records = report["trials"]
    assert len(records) >= (10 if kind == "kill" else 5)
    bad = [r for r in records if not r["ok"]]
    assert not bad, bad  # every kill: loadable, and exactly the old or the new adapter
    assert sum(r["mid_save"] for r in records) >= len(records) // 2  # kills hit saves
    assert report["after_clean_save"] == []  # the next save removed every leftover
    assert report["final"] == report["expected_final"]
    names = FILES if kind == "kill" else [LORA_CONFIG_NAME, LORA_WEIGHTS_NAME]
    assert report["visible"] == sorted(names)


@pytest.mark.slow
def test_concurrent_savers_last_commit_wins_and_readers_never_fail(trials):
    report = trials["concurrent"]
    assert report["writer_exit_codes"] == [0, 0]
    assert report["reader_loads"] > 0 and report["reader_failures"] == []
    assert report["final"] in report["last_of_each_writer"]
    assert report["leftovers"] == [] and report["visible"] == sorted(FILES)


# ----------------------------------------------------------------- failures before commit
def _failing(monkeypatch, which: str, exc: BaseException) -> None:
    """Make the writer of file ``which`` write part of its file, then raise ``exc``."""
    real = pio._adapter_files

    def files(*args, **kwargs):
        writers = real(*args, **kwargs)

        def broken(path: Path) -> None:
            path.write_bytes(b"partial")
            raise exc

        return {**writers, which: broken}

    monkeypatch.setattr(pio, "_adapter_files", files)


@pytest.mark.parametrize("which", FILES)
@pytest.mark.parametrize(
    "exc",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("boom"), KeyboardInterrupt()],
    ids=["ENOSPC", "error", "KeyboardInterrupt"],
)
def test_a_failing_writer_leaves_the_old_adapter(tmp_path, monkeypatch, which, exc):
    old = adapter(1.0)
    old.save_pretrained(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in FILES}
    _failing(monkeypatch, which, exc)
    with pytest.raises(type(exc)):
        adapter(2.0, r=3).save_pretrained(tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in FILES} == before
    assert loads_as(tmp_path, old)
    assert store_entries(tmp_path) == []  # the failed save's files are gone
    monkeypatch.undo()
    new = adapter(3.0, r=3)
    new.save_pretrained(tmp_path)
    assert loads_as(tmp_path, new) and store_entries(tmp_path) == []


def test_failing_safetensors_save_file_leaves_the_old_adapter(tmp_path, monkeypatch):
    old = adapter(1.0)
    old.save_pretrained(tmp_path)

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        adapter(2.0).save_pretrained(tmp_path)
    assert loads_as(tmp_path, old) and store_entries(tmp_path) == []


@pytest.mark.parametrize("step", ["fsync", "mkdir", "rename", "symlink", "replace"])
def test_a_full_disk_at_any_step_before_the_commit_leaves_the_old_adapter(
    tmp_path, monkeypatch, step
):
    old = adapter(1.0)
    old.save_pretrained(tmp_path)
    enospc = OSError(errno.ENOSPC, "No space left on device")
    real = {
        "fsync": os.fsync,
        "mkdir": os.mkdir,
        "rename": os.rename,
        "symlink": os.symlink,
        "replace": os.replace,
    }

    def failing(*args, **kwargs):
        if step in {"replace", "symlink"} and "current" not in str(args[-1]):
            return real[step](*args, **kwargs)  # only the commit point fails
        raise enospc

    monkeypatch.setattr(os, step, failing)
    with pytest.raises(OSError, match="No space left"):
        adapter(2.0).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert loads_as(tmp_path, old)
    assert store_entries(tmp_path) == []
    assert visible(tmp_path) == FILES


@pytest.mark.parametrize("which", [LORA_WEIGHTS_NAME, LORA_CONFIG_NAME])
def test_a_failing_export_leaves_the_previous_export(tmp_path, monkeypatch, which):
    paca.export_lora(adapter(1.0), tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in (LORA_CONFIG_NAME, LORA_WEIGHTS_NAME)}
    enospc = OSError(errno.ENOSPC, "No space left on device")
    if which == LORA_WEIGHTS_NAME:
        monkeypatch.setattr(
            "safetensors.torch.save_file", lambda *a, **k: (_ for _ in ()).throw(enospc)
        )
    else:
        real = Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name == LORA_CONFIG_NAME:
                real(self, "{", encoding="utf-8")
                raise enospc
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError, match="No space left"):
        paca.export_lora(adapter(2.0, r=3), tmp_path)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert store_entries(tmp_path, LORA_STORE) == []


def test_an_exception_after_the_commit_keeps_the_new_adapter(tmp_path, monkeypatch, caplog):
    adapter(1.0).save_pretrained(tmp_path)
    monkeypatch.setattr(atomic, "_cleanup", lambda *a: (_ for _ in ()).throw(OSError("late")))
    new = adapter(2.0)
    new.save_pretrained(tmp_path)  # committed: a failed tidy-up is a warning, not an error
    assert loads_as(tmp_path, new) and "tidying the folder failed" in caplog.text


# ----------------------------------------------------------------- leftovers and layout
def test_no_temporary_files_survive_a_save_and_stale_ones_are_removed(tmp_path):
    adapter(1.0).save_pretrained(tmp_path)
    store = tmp_path / pio.STORE
    assert visible(tmp_path) == FILES and store_entries(tmp_path) == []
    assert sorted(p.name for p in (store / os.readlink(store / "current")).iterdir()) == FILES
    for name in FILES:  # the documented names are links through the one commit point
        assert os.readlink(tmp_path / name) == f"{pio.STORE}/current/{name}"
    dead = store / "tmp-dead"  # a killed writer's work: its lock is free
    dead.mkdir()
    (dead / atomic.WRITING).touch()
    (dead / pio.WEIGHTS_NAME).write_bytes(b"half")
    (store / "g-superseded").mkdir()
    (tmp_path / f".{pio.CONFIG_NAME}.x.lnk").symlink_to("nowhere")
    (tmp_path / "training_args.bin").write_bytes(b"other files are left alone")
    new = adapter(2.0)
    new.save_pretrained(tmp_path)
    assert store_entries(tmp_path) == []
    assert visible(tmp_path) == sorted([*FILES, "training_args.bin"])
    assert loads_as(tmp_path, new)


def test_a_live_writers_work_in_progress_is_not_deleted(tmp_path):
    adapter(1.0).save_pretrained(tmp_path)
    live = tmp_path / pio.STORE / "tmp-live"
    live.mkdir()
    fd = os.open(live / atomic.WRITING, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a concurrent writer holds it while it writes
    try:
        adapter(2.0).save_pretrained(tmp_path)
        assert live.is_dir()
    finally:
        os.close(fd)  # the writer "dies"
    adapter(3.0).save_pretrained(tmp_path)
    assert not live.exists() and store_entries(tmp_path) == []


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)])  # fmt: skip
def test_files_and_folders_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        adapter(1.0).save_pretrained(tmp_path / "paca")
        paca.export_lora(adapter(1.0), tmp_path / "lora")
        atomic.write_text(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    folders = [(tmp_path / "paca", pio.STORE, FILES),
               (tmp_path / "lora", LORA_STORE, [LORA_CONFIG_NAME, LORA_WEIGHTS_NAME])]  # fmt: skip
    for folder, store, names in folders:
        for name in names:
            assert (folder / name).stat().st_mode & 0o777 == file_mode, (folder, name)
        for d in (folder, folder / store, (folder / store / "current").resolve()):
            assert d.stat().st_mode & 0o777 == dir_mode, d
    assert (tmp_path / "note.txt").stat().st_mode & 0o777 == file_mode


def test_each_adapter_folder_is_its_own_unit(tmp_path):
    model = adapter(1.0)
    model.add_adapter("second", paca.PacaConfig(r=3, target_modules=["2"]))
    model.save_pretrained(tmp_path)
    assert visible(tmp_path) == sorted([*FILES, "second"])
    assert visible(tmp_path / "second") == FILES and (tmp_path / "second" / pio.STORE).is_dir()
    model.save_pretrained(tmp_path)
    assert store_entries(tmp_path) == [] and store_entries(tmp_path / "second") == []
    assert loads_as(tmp_path, model)


def test_copies_of_a_folder_load_and_are_independent(tmp_path):
    first = adapter(1.0)
    first.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "links", symlinks=True)  # cp -r, rsync -a
    shutil.copytree(tmp_path / "a", tmp_path / "flat")  # follows links: plain files
    assert not (tmp_path / "flat" / pio.CONFIG_NAME).is_symlink()
    for copy in ("links", "flat"):
        assert loads_as(tmp_path / copy, first)
        second = adapter(float(len(copy)))
        second.save_pretrained(tmp_path / copy)
        assert loads_as(tmp_path / copy, second) and store_entries(tmp_path / copy) == []
        assert loads_as(tmp_path / "a", first)


def test_without_symlinks_files_are_replaced_one_by_one_with_a_warning(
    tmp_path, monkeypatch, caplog
):
    def no_symlinks(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    first = adapter(1.0)
    first.save_pretrained(tmp_path)
    assert "does not support symbolic links" in caplog.text
    assert not (tmp_path / pio.CONFIG_NAME).is_symlink() and loads_as(tmp_path, first)
    second = adapter(2.0)
    second.save_pretrained(tmp_path)
    assert loads_as(tmp_path, second) and visible(tmp_path) == FILES


def test_files_edited_in_place_or_replaced_by_other_tools_are_what_loads(tmp_path):
    adapter(1.0).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / pio.CONFIG_NAME).read_text())
    tensors = load_file(tmp_path / pio.WEIGHTS_NAME)
    tensors["2.delta"] = torch.full_like(tensors["2.delta"], 5.0)
    body = {k: v for k, v in meta.items() if k != "fingerprint"}
    fp = pio._fingerprint(tensors, body)
    # safetensors replaces the link with a file; write_text writes through the link
    save_file(tensors, str(tmp_path / pio.WEIGHTS_NAME), metadata={"paca_fingerprint": fp})
    (tmp_path / pio.CONFIG_NAME).write_text(json.dumps({**body, "fingerprint": fp}))
    loaded = paca.load(base(), tmp_path)
    assert torch.equal(loaded.model[2].paca_delta["default"], tensors["2.delta"])
    new = adapter(2.0)
    new.save_pretrained(tmp_path)  # the folder goes back to one unit
    assert (tmp_path / pio.WEIGHTS_NAME).is_symlink() and loads_as(tmp_path, new)
    assert store_entries(tmp_path) == []


def test_a_save_killed_before_it_linked_the_names_still_loads(tmp_path):
    new = adapter(1.0)
    new.save_pretrained(tmp_path)
    for name in FILES:  # as a first save into a fresh folder killed right after the commit
        (tmp_path / name).unlink()
    assert loads_as(tmp_path, new)
    newer = adapter(2.0)
    newer.save_pretrained(tmp_path)
    assert visible(tmp_path) == FILES and loads_as(tmp_path, newer)


# ----------------------------------------------------------------- single-file writes
def test_write_file_is_atomic_and_removes_stale_temporaries(tmp_path):
    target = tmp_path / "summary.json"
    atomic.write_json(target, {"v": 1})

    def broken(path: Path) -> None:
        path.write_text("{half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic.write_file(target, broken)
    assert json.loads(target.read_text()) == {"v": 1}
    stale = tmp_path / ".summary.json.killed.tmp"  # from a killed writer
    stale.write_text("x")
    old = time.time() - 60
    os.utime(stale, (old, old))
    atomic.write_text(target, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_one_atomic_writer_in_the_package():
    """Every replace-by-rename in paca goes through paca.atomic."""
    package = HERE.parent / "paca"
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "atomic.py"
        and any(s in path.read_text() for s in ("os.replace(", "os.rename(", "mkstemp("))
    ]
    assert offenders == []


# ----------------------------------------------------------------- formats cannot clobber
def test_export_into_a_paca_folder_is_refused_and_the_adapter_survives(tmp_path):
    model = adapter(1.0)
    model.save_pretrained(tmp_path)
    with pytest.raises(pio.AdapterFormatError, match=r"holds a PaCA adapter.*another folder"):
        paca.export_lora(model, tmp_path)
    assert visible(tmp_path) == FILES and loads_as(tmp_path, model)


def test_save_into_a_peft_folder_is_refused_and_the_lora_survives(tmp_path):
    model = adapter(1.0)
    paca.export_lora(model, tmp_path)
    before = (tmp_path / LORA_WEIGHTS_NAME).read_bytes()
    with pytest.raises(pio.AdapterFormatError, match=r"holds a PEFT LoRA adapter"):
        model.save_pretrained(tmp_path)
    with pytest.raises(pio.AdapterFormatError):  # also as a sub-folder's check
        pio.save_adapter(model, tmp_path, "default")
    assert visible(tmp_path) == [LORA_CONFIG_NAME, LORA_WEIGHTS_NAME]
    assert (tmp_path / LORA_WEIGHTS_NAME).read_bytes() == before
    paca.export_lora(adapter(2.0), tmp_path)  # re-exporting into an export folder is fine
    assert store_entries(tmp_path, LORA_STORE) == []


def test_a_file_is_not_a_folder_to_save_into(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        adapter(1.0).save_pretrained(tmp_path / "f")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        paca.export_lora(adapter(1.0), tmp_path / "f")


def test_loading_a_peft_folder_says_what_it_holds_and_how_to_load_it(tmp_path):
    paca.export_lora(adapter(1.0), tmp_path)
    with pytest.raises(
        pio.AdapterFormatError, match=r"PEFT LoRA.*peft\.PeftModel\.from_pretrained"
    ):
        paca.load(base(), tmp_path)


def _legacy_folder(folder: Path, model: paca.PacaModel) -> None:
    """The layout older paca versions wrote: plain files, PEFT's weights name."""
    model.save_pretrained(folder / "new")
    meta = json.loads((folder / "new" / pio.CONFIG_NAME).read_text())
    tensors = load_file(folder / "new" / pio.WEIGHTS_NAME)
    save_file(
        tensors,
        str(folder / pio.LEGACY_WEIGHTS_NAME),
        metadata={"format": "pt", "paca_fingerprint": meta["fingerprint"]},
    )
    (folder / pio.CONFIG_NAME).write_text(json.dumps(meta))
    shutil.rmtree(folder / "new")


def test_adapters_saved_by_older_paca_load_and_are_upgraded_on_save(tmp_path):
    old = adapter(1.0)
    _legacy_folder(tmp_path, old)
    assert loads_as(tmp_path, old)
    with pytest.raises(pio.AdapterFormatError, match="holds a PaCA adapter"):
        paca.export_lora(old, tmp_path)  # would overwrite adapter_model.safetensors
    new = adapter(2.0)
    new.save_pretrained(tmp_path)
    assert visible(tmp_path) == FILES  # adapter_model.safetensors is gone
    assert loads_as(tmp_path, new) and store_entries(tmp_path) == []


def test_a_paca_folder_clobbered_by_an_old_export_says_so(tmp_path):
    _legacy_folder(tmp_path, adapter(1.0))
    (tmp_path / pio.LEGACY_WEIGHTS_NAME).unlink()
    paca.export_lora(adapter(1.0), tmp_path / "lora")  # what old paca wrote over it
    for name in (LORA_CONFIG_NAME, LORA_WEIGHTS_NAME):
        shutil.copyfile(tmp_path / "lora" / name, tmp_path / name)
    with pytest.raises(pio.AdapterFormatError, match="overwrote them"):
        paca.load(base(), tmp_path)


# ----------------------------------------------------------------- load errors
def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "weights truncated": (pio.WEIGHTS_NAME, lambda p: _truncate(p, 0.9), "truncated or damaged"),
    "weights header cut": (pio.WEIGHTS_NAME, lambda p: _truncate(p, 0.002), "truncated or damaged"),
    "weights empty": (pio.WEIGHTS_NAME, lambda p: p.write_bytes(b""), "truncated or damaged"),
    "weights garbage": (pio.WEIGHTS_NAME, lambda p: p.write_bytes(b"x" * 64), "truncated or damaged"),
    "config truncated": (pio.CONFIG_NAME, lambda p: _truncate(p, 0.5), "not valid JSON.*cut off"),
    "config empty": (pio.CONFIG_NAME, lambda p: p.write_text(""), "not valid JSON.*empty"),
    "config binary": (pio.CONFIG_NAME, lambda p: p.write_bytes(b"\xff\xfe\x00"), "not a UTF-8"),
    "config a list": (pio.CONFIG_NAME, lambda p: p.write_text("[1]"), "JSON list, not a PaCA"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_file_is_named_with_its_path_and_what_to_do(tmp_path, case):
    name, damage, what = DAMAGE[case]
    adapter(1.0).save_pretrained(tmp_path)
    damage(tmp_path / name)
    with pytest.raises(pio.AdapterFileError, match=what) as info:
        paca.load(base(), tmp_path)
    message = str(info.value)
    assert str(tmp_path / name) in message and "save the adapter again" in message
    assert info.value.path == tmp_path / name


def test_flipped_tensor_bytes_blame_the_weights_file(tmp_path):
    adapter(1.0).save_pretrained(tmp_path)
    path = tmp_path / pio.WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data; the header stays valid
    path.write_bytes(bytes(data))
    with pytest.raises(pio.AdapterFileError, match="damaged or was modified") as info:
        paca.load(base(), tmp_path)
    assert info.value.path == path


def test_an_edited_config_is_blamed_on_the_config_file(tmp_path):
    adapter(1.0).save_pretrained(tmp_path)
    path = tmp_path / pio.CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["config"]["seed"] = 7
    meta["modules"]["2"]["weight_shape"] = [6, 99]
    path.write_text(json.dumps(meta))
    with pytest.raises(pio.AdapterFileError) as info:
        paca.load(base(), tmp_path)
    message = str(info.value)
    assert info.value.path == path and f"{path} was edited after saving" in message
    assert "'config.seed' is 7, was 3" in message and "'modules.2.weight_shape'" in message
    assert pio.WEIGHTS_NAME not in message.split("fingerprint recorded with")[0]


def test_files_from_two_saves_are_reported_as_such(tmp_path):
    adapter(1.0).save_pretrained(tmp_path / "a")
    adapter(2.0, r=3).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / pio.CONFIG_NAME).write_bytes((tmp_path / "b" / pio.CONFIG_NAME).read_bytes())
    with pytest.raises(
        pio.AdapterFileError, match=r"come from different saves.*'config.r' is 3, was 2"
    ):
        paca.load(base(), tmp_path / "a")


@pytest.mark.parametrize(
    "version, what",
    [(99, "Upgrade paca"), ("1", "was edited or is not a PaCA"), (None, "was edited")],
)
def test_format_version_errors_name_the_config(tmp_path, version, what):
    adapter(1.0).save_pretrained(tmp_path)
    path = tmp_path / pio.CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["format_version"] = version
    path.write_text(json.dumps(meta))
    with pytest.raises(pio.AdapterFileError, match=what) as info:
        paca.load(base(), tmp_path)
    assert info.value.path == path and str(path) in str(info.value)


def test_missing_folders_and_files_say_what_is_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        paca.load(base(), tmp_path / "nope")
    adapter(1.0).save_pretrained(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="pass the folder that holds it"):
        paca.load(base(), tmp_path / "a" / pio.CONFIG_NAME)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"missing paca_config.json, paca_adapter.*notes"):
        paca.load(base(), tmp_path / "b")
