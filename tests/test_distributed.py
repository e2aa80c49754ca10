"""Quantizing on Ray workers (distributed.py, `--workers`, `--ray-address`): the same bytes as one process,
a killed worker survived, a cluster that cannot be reached refused at once. Tiny models, a local Ray runtime."""
import subprocess
import sys

import pytest

from pvq.cli import main as cli
from pvq.distributed import FAULT_ENV
from pvq.models.loading import tiny_model, tiny_tokenizer

pytest.importorskip("ray")

ARGS = ["--method", "pvq", "--bits", "3.25", "--no-progress"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tiny_model("llama", num_hidden_layers=4).save_pretrained(root / "src")
    tiny_tokenizer().save_pretrained(root / "src")
    assert cli(["quantize", str(root / "src"), *ARGS, "-o", str(root / "one")]) == 0
    return root


def _files(d):
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


@pytest.mark.parametrize("workers", [1, 3])
def test_the_same_bytes_on_any_number_of_workers(source, tmp_path, workers):
    assert cli(["quantize", str(source / "src"), *ARGS, "--workers", str(workers), "-o", str(tmp_path / "q")]) == 0
    assert _files(tmp_path / "q") == _files(source / "one")


def test_blocks_of_a_model_loaded_whole_travel_with_their_tasks(source, tmp_path):
    """--no-stream (like a GGUF file): the driver holds the float model and sends each task its block."""
    assert cli(["quantize", str(source / "src"), *ARGS, "--no-stream", "--workers", "2", "-o", str(tmp_path / "q")]) == 0
    assert _files(tmp_path / "q") == _files(source / "one")


def test_a_killed_worker_is_replaced_and_the_bytes_are_the_same(source, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"2:{marker}")  # block 2's first run kills its worker process
    assert cli(["quantize", str(source / "src"), *ARGS, "--workers", "2", "-o", str(tmp_path / "q")]) == 0
    assert marker.exists()
    assert _files(tmp_path / "q") == _files(source / "one")


def test_an_unreachable_cluster_is_one_line(source, tmp_path, capsys):
    assert cli(["quantize", str(source / "src"), *ARGS, "--ray-address", "127.0.0.1:1", "-o", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


GPTQ = ["--method", "pvq-gptq", "--bits", "3.25", "--nsamples", "10", "--seqlen", "32", "--calib-shards", "3",
        "--calib-dtype", "float32", "--no-progress"]


@pytest.fixture(scope="module")
def calibrated(source):
    """pvq-gptq in one process without Ray: the bytes every worker count must give."""
    assert cli(["quantize", str(source / "src"), *GPTQ, "-o", str(source / "gptq-one")]) == 0
    return source / "gptq-one"


@pytest.mark.parametrize("workers", [1, 3])
def test_a_hessian_method_gives_the_same_bytes_on_any_number_of_workers(source, calibrated, tmp_path, workers):
    """Shards of 4, 3 and 3 samples (batches restart at each shard), Hessians added in shard order, linears
    solved as parallel tasks: the file of one process, whatever the worker count."""
    assert cli(["quantize", str(source / "src"), *GPTQ, "--workers", str(workers), "-o", str(tmp_path / "q")]) == 0
    assert _files(tmp_path / "q") == _files(calibrated)


def test_calibration_shards_are_a_setting_stored_with_the_file(source, calibrated, tmp_path):
    import json

    assert json.loads((calibrated / "config.json").read_text())["quantization_config"]["config"]["calib_shards"] == 3
    one = [a if a != "3" or GPTQ[i - 1] != "--calib-shards" else "1" for i, a in enumerate(GPTQ)]
    assert cli(["quantize", str(source / "src"), *one, "-o", str(tmp_path / "q")]) == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config"]
    assert "calib_shards" not in cfg  # one shard is the plain sum every earlier file was made with


def test_a_worker_killed_while_calibrating_is_replaced_and_the_bytes_are_the_same(source, calibrated, tmp_path,
                                                                                  monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"1:{marker}")  # the first Hessian task of block 1 kills its worker process
    assert cli(["quantize", str(source / "src"), *GPTQ, "--workers", "2", "-o", str(tmp_path / "q")]) == 0
    assert marker.exists()
    assert _files(tmp_path / "q") == _files(calibrated)


def test_without_the_options_ray_is_not_imported(source, tmp_path):
    code = ("import sys; from pvq.cli import main; "
            f"assert main(['quantize', {str(source / 'src')!r}, *{ARGS!r}, '-o', {str(tmp_path / 'q')!r}]) == 0; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_a_killed_driver_is_resumed_by_rerunning_the_command(source, calibrated, tmp_path):
    """kill -9 of the process that writes (Ray's local processes die with it) once two blocks are done; the
    same command again continues after them, from the activations the workers wrote, and writes the bytes
    of the uninterrupted run."""
    import json
    import os
    import signal
    import time
    from pathlib import Path

    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "pvq.cli", "quantize", str(source / "src"), *GPTQ, "--workers", "2", "-o", str(out)]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def blocks_done():
        for m in tmp_path.glob("q.tmp-*/manifest.json"):
            try:
                return len(json.loads(m.read_text())["blocks"])
            except (OSError, ValueError):
                pass
        return 0

    deadline = time.time() + 300
    while p.poll() is None and blocks_done() < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before two blocks were done"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    # the activations at the last boundary were written by the workers, one file per shard, not by the driver
    (work,) = tmp_path.glob("q.tmp-*")
    acts = json.loads((work / "manifest.json").read_text())["activations"]
    assert isinstance(acts, list) and len(acts) == 3 and all((work / f).is_file() for f in acts)
    assert cli(["quantize", str(source / "src"), *GPTQ, "--workers", "2", "-o", str(out)]) == 0
    assert _files(out) == _files(calibrated)


def test_solves_get_threads_by_their_share_of_the_work():
    from pvq.distributed import solve_threads

    costs = {"q": 1, "k": 1, "down": 30}
    assert solve_threads(costs, 1, 1) == {"q": 1, "k": 1, "down": 1}  # one CPU: one thread each, queued
    assert solve_threads(costs, 64, 32) == {"q": 2, "k": 2, "down": 32}  # a task never spans two nodes
    assert solve_threads(costs, 64, 64) == {"q": 2, "k": 2, "down": 60}


def test_state_blocks_carry_from_block_to_block_gives_the_same_bytes_on_workers(tmp_path):
    """Hunyuan-V4's indexer choices, which a layer hands the next (Gemma 4 E2B's keys and values, which its first
    layers store for the last ones, go the same way: adapters.carry): each shard's worker carries its samples'
    own on both streams of --asymmetric, so the file is the one process's."""
    tiny_model("hy_v4").save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    args = [str(tmp_path / "src"), *GPTQ, "--asymmetric", "0.5", "--asymmetric-samples", "7"]
    assert cli(["quantize", *args, "-o", str(tmp_path / "one")]) == 0
    assert cli(["quantize", *args, "--workers", "2", "-o", str(tmp_path / "two")]) == 0
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
