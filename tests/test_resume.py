"""A run killed at any moment and rerun continues where it stopped and writes the very bytes an uninterrupted
run writes (issue "Any size": resume). Tiny random models; real `kill -9` of a real process."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvq.cli import main as cli
from pvq.models.loading import tiny_model, tiny_tokenizer

ARGS = ["--method", "pvq-gptq", "--bits", "3", "--nsamples", "4", "--seqlen", "32", "--no-progress"]
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tiny_model("llama", num_hidden_layers=6).save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    (root / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return root


def _digests(d: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def _cmd(root, out, *extra):
    return [sys.executable, "-m", "pvq.cli", "quantize", str(root / "hf"), *ARGS, "--calib", str(root / "calib.txt"),
            "-o", str(out), *extra]


def _env():
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _blocks_done(out: Path) -> int:
    import json
    for m in out.parent.glob(f"{out.name}.tmp-*/manifest.json"):
        try:
            return len(json.loads(m.read_text())["blocks"])
        except (OSError, ValueError):
            pass
    return 0


def _run_and_kill(root, out, when) -> bool:
    """Start a quantize run and kill -9 it once `when(out)` holds; False if it finished first."""
    p = subprocess.Popen(_cmd(root, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None:
        if when(out):
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.005)
    return False


@pytest.fixture(scope="module")
def reference(model_dir):
    out = model_dir / "reference"
    assert cli(["quantize", str(model_dir / "hf"), *ARGS, "--calib", str(model_dir / "calib.txt"), "-o", str(out)]) == 0
    return _digests(out)


@pytest.mark.parametrize("kills", [(2, 5)])
def test_killed_and_rerun_gives_the_same_bytes(model_dir, reference, tmp_path, kills):
    out = tmp_path / "out"
    for k in kills:  # kill once k blocks are done, then (for the next k) kill the rerun again
        assert _run_and_kill(model_dir, out, lambda o, k=k: _blocks_done(o) >= k)
        assert not out.exists()  # nothing that looks complete
        assert _blocks_done(out) >= k
    r = subprocess.run(_cmd(model_dir, out), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "blocks were done" in r.stderr
    assert _digests(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the unfinished run's directory is gone


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "workers"])
def test_a_run_killed_after_its_last_block_calibrates_the_head_on_the_saved_outputs(model_dir, tmp_path, workers):
    """The head is quantized after every block, from the last block's outputs: those are kept with that block (on
    workers, as one file per calibration shard), and a rerun writes the bytes of one uninterrupted process."""
    if workers:
        pytest.importorskip("ray")
    ends = ["--head-bits", "4", "--embed-bits", "4", *(["--calib-shards", "2"] if workers else [])]
    whole = tmp_path / "whole"
    assert cli(["quantize", str(model_dir / "hf"), *ARGS, *ends, "--calib", str(model_dir / "calib.txt"),
                "-o", str(whole)]) == 0
    out = tmp_path / "out"
    ends += ["--workers", "2"] if workers else []
    p = subprocess.Popen(_cmd(model_dir, out, *ends), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and _blocks_done(out) < 6:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if not out.exists():
        assert _blocks_done(out) == 6
        r = subprocess.run(_cmd(model_dir, out, *ends), env=_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "resuming" in r.stderr
    assert _digests(out) == _digests(whole)


def test_killed_at_random_moments(model_dir, reference, tmp_path):
    out = tmp_path / "out"
    start = time.time()
    for delay in (3.0, 5.0):  # seconds after the start: imports, loading, calibration, blocks
        _run_and_kill(model_dir, out, lambda o, t0=time.time(), d=delay: time.time() - t0 > d)
        if out.exists():  # a (resumed) run wrote the whole output before that moment (it appears whole or not)
            break
    if not out.exists():
        r = subprocess.run(_cmd(model_dir, out), env=_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert _digests(out) == reference
    assert time.time() - start < 120


def test_an_interrupted_run_keeps_its_finished_blocks_and_the_same_command_continues(model_dir, reference, tmp_path,
                                                                                    monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) while block 3 is quantized: the two blocks done stay, as a killed run's do."""
    from pvq import api

    real, calls = api.quantize_linears, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "quantize_linears", interrupted)
    out = tmp_path / "out"
    cmd = ["quantize", str(model_dir / "hf"), *ARGS, "--calib", str(model_dir / "calib.txt"), "-o", str(out)]
    assert cli(cmd) == 130
    assert "the same command continues after them" in capsys.readouterr().err
    assert not out.exists() and _blocks_done(out) == 2
    monkeypatch.setattr(api, "quantize_linears", real)
    assert cli(cmd) == 0
    assert "resuming" in capsys.readouterr().err and _digests(out) == reference


def test_other_inputs_are_refused_then_force_starts_over(model_dir, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run_and_kill(model_dir, out, lambda o: _blocks_done(o) >= 2)
    other = ["quantize", str(model_dir / "hf"), *ARGS, "--calib", str(model_dir / "calib.txt"), "--damp", "0.02",
             "-o", str(out)]
    assert cli(other) == 2
    err = capsys.readouterr().err
    assert "unfinished run" in err and "settings.damp: 0.01 then, 0.02 now" in err and "--force" in err
    assert cli([*other, "--force"]) == 0
    assert _digests(out) != reference  # another damping, another model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_what_blocks_carry_is_saved_with_the_activations_and_read_back_in_sample_order(tmp_path):
    """What a stream carries from block to block (adapters.carry: a mapping's state, tensors or tuples of them;
    what a block hands the next, or None) is saved beside the activations, one file per calibration shard where
    workers write them, and read back joined in sample order."""
    import torch

    from pvq import tensorfile
    from pvq.checkpoint import _carried, save_activations
    from pvq.models.adapters import cut_carried, join_carried

    g = torch.Generator().manual_seed(0)
    carried = {("shared_kv_states", "full_attention"): (torch.randn(5, 1, 4, 8, generator=g), torch.randn(5, 1, 4, 8)),
               ("shared_kv_states", "sliding_attention"): torch.randn(5, 3, generator=g),
               ("prev_topk_indices", None): torch.randint(0, 9, (5, 4, 2), generator=g), ("index_pool", None): None}
    for j, (s, e) in enumerate([(0, 3), (3, 5)]):
        save_activations(torch.zeros(e - s, 4, 8), tmp_path / f"{j}.safetensors", cut_carried(carried, s, e))
    back = join_carried([_carried(tensorfile.entries(tmp_path / f"{j}.safetensors")) for j in range(2)])
    assert back.keys() == carried.keys() and back[("index_pool", None)] is None

    def same(a, b):
        return all(map(same, a, b)) if isinstance(a, tuple) else torch.equal(a, b)
    assert all(same(back[k], carried[k]) for k in carried if carried[k] is not None)
    assert isinstance(back[("shared_kv_states", "full_attention")], tuple)
