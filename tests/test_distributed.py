"""Quantizing on Ray workers (distributed.py, `--workers`, `--ray-address`): the same bytes as one process,
a killed worker survived, a cluster that cannot be reached refused at once. Tiny models, a local Ray runtime."""
import subprocess
import sys

import pytest
import torch

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


# the data-free path on workers gives the one process's bytes: test_a_killed_worker_is_replaced_and_the_bytes_are_the_same
# (2 workers, one killed) and test_blocks_of_a_model_loaded_whole_travel_with_their_tasks; a run of 3 workers without
# a fault was a test of its own (14 s of a suite that must stay under 15 minutes)


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


def test_a_hessian_method_gives_the_same_bytes_on_workers_one_of_them_killed(source, calibrated, tmp_path,
                                                                               monkeypatch):
    """Shards of 4, 3 and 3 samples (batches restart at each shard) on 3 workers, Hessians added in shard order,
    linears solved as parallel tasks, the first Hessian task of block 1 killing its worker process: the file of
    one process."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"1:{marker}")
    assert cli(["quantize", str(source / "src"), *GPTQ, "--workers", "3", "-o", str(tmp_path / "q")]) == 0
    assert marker.exists()
    assert _files(tmp_path / "q") == _files(calibrated)


def test_a_calibrated_head_on_workers_gives_the_bytes_of_one_process(source, tmp_path):
    """--head-bits with pvq-gptq: the last block's outputs come back from the workers' shards for the head's
    Hessian, which the driver measures and solves as one process does."""
    ends = ["--head-bits", "4.25", "--embed-bits", "4.25"]
    assert cli(["quantize", str(source / "src"), *GPTQ, *ends, "-o", str(tmp_path / "one")]) == 0
    assert cli(["quantize", str(source / "src"), *GPTQ, *ends, "--workers", "2", "-o", str(tmp_path / "q")]) == 0
    assert _files(tmp_path / "q") == _files(tmp_path / "one")


def test_calibration_shards_are_a_setting_stored_with_the_file(source, calibrated, tmp_path):
    import json

    assert json.loads((calibrated / "config.json").read_text())["quantization_config"]["config"]["calib_shards"] == 3
    one = [a if a != "3" or GPTQ[i - 1] != "--calib-shards" else "1" for i, a in enumerate(GPTQ)]
    assert cli(["quantize", str(source / "src"), *one, "-o", str(tmp_path / "q")]) == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config"]
    assert "calib_shards" not in cfg  # one shard is the plain sum every earlier file was made with


def test_without_the_options_ray_is_not_imported(source, tmp_path):
    code = ("import sys; from pvq.cli import main; "
            f"assert main(['quantize', {str(source / 'src')!r}, *{ARGS!r}, '-o', {str(tmp_path / 'q')!r}]) == 0; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# a killed driver resumed by rerunning the command, from the activations the workers wrote: test_asymmetric's
# test_killed_asymmetric_run_resumes_to_the_same_bytes[workers] (pvq-gptq on 2 workers, its unquantized stream too)


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
    # the workers' tasks run on one thread each; on some CPUs (an Intel Xeon's oneDNN) this family's float32
    # products differ in their last bits with the thread count, which its routers then turn into other
    # choices: the one process runs on one thread too, so what is compared is the carrying
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli(["quantize", *args, "-o", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert cli(["quantize", *args, "--workers", "2", "-o", str(tmp_path / "two")]) == 0
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
