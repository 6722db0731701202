"""Fault trials for tests/test_io_atomic.py, run in one subprocess (torch imports once).

    python tests/atomic_worker.py OUT.json WORKDIR [--trials N] [--budget SECONDS] [--seed S]

* ``kill`` / ``kill_export``: a forked child saves (``save_pretrained`` / ``export_lora``)
  in a loop, adapter ``k`` = 1, 2, 3 ... (every delta filled with ``k``; ``r`` 2 for even
  ``k``, 4 for odd, so config and weights differ between saves); it reports "start k" and
  "done k" through a pipe. The parent SIGKILLs it after a random delay, then reads the
  folder: it must hold exactly the last finished adapter (old) or the one being saved
  (new), never a mix, never nothing.
* ``concurrent``: two forked writers save 12 adapters each into one folder at once while
  a third process loads it in a loop; every load must succeed and give one whole adapter,
  and the folder must end with one of the two writers' last adapters, with no leftovers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # no thread pool exists when we fork

from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

import paca  # noqa: E402
import paca.io as pio  # noqa: E402
from paca.export import LORA_CONFIG_NAME, LORA_STORE, LORA_WEIGHTS_NAME  # noqa: E402


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 48))


def rank(k: int) -> int:
    return 2 if k % 2 == 0 else 4


MODELS = {r: paca.wrap(base(), paca.PacaConfig(r=r, target_modules=["0", "2"])) for r in (2, 4)}
IDX = {
    r: {n: lay.paca_idx["default"].clone() for n, lay in m.paca_layers()} for r, m in MODELS.items()
}


def adapter(k: int) -> paca.PacaModel:
    model = MODELS[rank(k)]
    with torch.no_grad():
        for _, layer in model.paca_layers():
            layer.paca_delta["default"].fill_(float(k))
    return model


def paca_state(folder: Path) -> int:
    """The ``k`` of the adapter in ``folder``, checked to be one whole adapter."""
    loaded = paca.load(base(), folder)
    r = loaded.paca_config.r
    values = set()
    for name, layer in loaded.paca_layers():
        assert torch.equal(layer.paca_idx["default"], IDX[r][name]), name
        values |= {float(v) for v in layer.paca_delta["default"].unique()}
    assert len(values) == 1, f"deltas from several saves: {sorted(values)}"
    k = int(values.pop())
    assert rank(k) == r, f"adapter {k} loaded with r={r}"
    return k


def export_state(folder: Path) -> int:
    """The ``k`` of the LoRA export in ``folder``, checked to be one whole export."""
    config = json.loads((folder / LORA_CONFIG_NAME).read_text())
    tensors = load_file(folder / LORA_WEIGHTS_NAME)
    values = {float(v) for key, t in tensors.items() if "lora_B" in key for v in t.unique()}
    assert len(values) == 1, f"LoRA B from several exports: {sorted(values)}"
    k = int(values.pop())
    ranks = {t.shape[0] for key, t in tensors.items() if "lora_A" in key}
    assert ranks == {config["r"]} == {rank(k)}, (ranks, config["r"], k)
    return k


def save(kind: str, folder: Path, k: int) -> None:
    if kind == "kill":
        adapter(k).save_pretrained(folder)
    else:
        paca.export_lora(adapter(k), folder)


def _saver(kind: str, folder: Path, k0: int, fd: int) -> None:
    k = k0
    while True:
        k += 1
        os.write(fd, f"s{k}\n".encode())
        save(kind, folder, k)
        os.write(fd, f"d{k}\n".encode())


def _leftovers(store: Path) -> list[str]:
    if not store.is_dir():
        return []
    current = os.readlink(store / "current") if (store / "current").is_symlink() else None
    return sorted(p.name for p in store.iterdir() if p.name not in {"current", "lock", current})


def kill_trials(kind: str, folder: Path, trials: int, budget: float, rng: random.Random) -> dict:
    state, store = (paca_state, pio.STORE) if kind == "kill" else (export_state, LORA_STORE)
    save(kind, folder, 1)
    k_done = 1
    records = []
    start = time.monotonic()
    for _ in range(trials):
        if time.monotonic() - start > budget:
            break
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the saver, killed below
            os.close(r)
            try:
                _saver(kind, folder, k_done, w)
            finally:
                os._exit(1)
        os.close(w)
        delay = rng.uniform(0.0, 0.12)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            log = f.read().split()
        started = max([int(x[1:]) for x in log if x.startswith("s")], default=k_done)
        finished = max([int(x[1:]) for x in log if x.startswith("d")], default=k_done)
        leftovers = _leftovers(folder / store)
        try:
            k, error = state(folder), None
        except Exception as exc:  # recorded, the test fails on it
            k, error = None, f"{type(exc).__name__}: {exc}"
        records.append(
            {
                "delay": round(delay, 4),
                "finished": finished,
                "started": started,
                "loaded": k,
                "error": error,
                "mid_save": started > finished,
                "leftovers": leftovers,
                "ok": error is None and k in {finished, started},
            }
        )
        k_done = k if k is not None else started
    save(kind, folder, k_done + 1)  # a clean save afterwards tidies every leftover
    return {
        "trials": records,
        "after_clean_save": _leftovers(folder / store),
        "final": state(folder),
        "expected_final": k_done + 1,
        "visible": sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")),
        "seconds": round(time.monotonic() - start, 2),
    }


def concurrent(folder: Path, saves: int) -> dict:
    adapter(1).save_pretrained(folder)
    pids = []
    for writer in (1, 2):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for i in range(saves):
                    # writer 1 saves odd k (r=4), writer 2 even k (r=2)
                    adapter(1000 * writer + 2 * i + (writer == 1)).save_pretrained(folder)
            except BaseException as exc:  # noqa: BLE001 - reported through the exit code
                print(f"writer {writer}: {type(exc).__name__}: {exc}", file=sys.stderr)
                code = 3
            finally:
                os._exit(code)
        pids.append(pid)
    r, w = os.pipe()
    reader = os.fork()
    if reader == 0:
        os.close(r)
        loads, failures = 0, []
        try:
            while True:  # until the parent stops us
                try:
                    paca_state(folder)
                    loads += 1
                except Exception as exc:  # noqa: BLE001 - counted
                    failures.append(f"{type(exc).__name__}: {exc}")
                os.write(
                    w, (json.dumps({"loads": loads, "failures": failures[:5]}) + "\n").encode()
                )
        finally:
            os._exit(0)
    os.close(w)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    time.sleep(0.2)
    os.kill(reader, signal.SIGKILL)
    os.waitpid(reader, 0)
    with os.fdopen(r) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    last = json.loads(lines[-1]) if lines else {"loads": 0, "failures": []}
    final = paca_state(folder)
    return {
        "writer_exit_codes": codes,
        "reader_loads": last["loads"],
        "reader_failures": last["failures"],
        "final": final,
        "last_of_each_writer": [1000 + 2 * (saves - 1) + 1, 2000 + 2 * (saves - 1)],
        "leftovers": _leftovers(folder / pio.STORE),
        "visible": sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("workdir")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--budget", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work, rng = Path(args.workdir), random.Random(args.seed)
    report = {
        "kill": kill_trials("kill", work / "paca", args.trials, args.budget, rng),
        "kill_export": kill_trials(
            "kill_export", work / "lora", max(args.trials // 2, 1), args.budget / 2, rng
        ),
        "concurrent": concurrent(work / "shared", saves=12),
    }
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
