"""Quantizing on many processes or machines with Ray: the same bytes as one process, in less time.

Ray (PyPI `ray`, the optional extra `pvq[distributed]`) does the scheduling, the retries and the
transport; pvq only says what a task is. Nothing here is imported unless `--workers` or
`--ray-address` is given.

Data-free methods (rtn, hqq, pvq): every block is an independent task. For a safetensors folder (at a
path every node can see) a worker reads the block's tensors from the checkpoint itself; a model the
driver had to load whole (a GGUF file, the default model) sends each task its float block. The worker
rotates and quantizes the block's linears exactly as `api.quantize` does in one process and returns
the block's stored tensors; the driver writes them in block order, so a file does not depend on which
worker ran what.
Hessian methods (gptq, pvq-gptq): the blocks stay in order and the work inside each is spread. The
calibration samples are cut into `calib_shards` shards (a setting, models/shards.py, never the worker
count); each shard's activations live in Ray's object store, owned by this process but kept on the node
whose task made them, and never fetched here: the task that computes them also writes them to the
writer's resume checkpoint, one file per shard (fetched only where a worker cannot see the output's
folder, another machine's disk). For each block, one task per shard returns the partial Hessian sums of its
samples, this process adds them in shard order (float64), the linears are solved as parallel tasks,
and one task per shard runs its activations through the quantized block, giving the next block's.
With --asymmetric each shard also carries the unquantized model's stream on its paired samples: the
shard's Hessian task runs that through the float block too, returning the cross moments with the sums
and leaving its outputs in the object store as the next block's; each solve moves its weight's target
first, as one process does.
One process computes the same sums in the same order (api.quantize), so the bytes are those of a run
without Ray with the same shard count.

Each task runs torch with one thread (Ray gives it one CPU), but a solve, which gets as many CPUs as its
share of the block's solving work (solve_threads), and as many threads. A worker process that dies is
replaced and its task run again (Ray's retries); the result is the same, since a task depends only on
its arguments: the checkpoint, the settings and the block index, or the shard's activations at the
last block boundary, which outlive the worker that made them.
"""
from __future__ import annotations

import copy
import os
import re
import socket
from pathlib import Path

import torch

from . import api
from .checkpoint import save_activations, stored_tensors
from .errors import one_line
from .models.adapters import (block_hessian_sums, block_input_sums, block_linears, block_prefix, blocks,
                              carried_after, cut_carried, held_of, join_carried, per_token, samples_of, with_carried)
from .models.shards import merge_asymmetric, paired_bounds, shard_bounds
from .models.streaming import materialize, release
from .settings import DENSE_DTYPES, QuantConfig, spec_to_dict

RETRIES = 3  # runs of a task whose worker died, before the run fails
FAULT_ENV = "PVQ_FAULT_KILL_BLOCK"  # "INDEX:MARKER": the first task of block INDEX kills its worker (tests)

_worker_models: dict[str, tuple] = {}  # per worker process: folder -> (skeleton, reader, pristine blocks)


class DistributedError(ValueError):
    """Ray is missing, a cluster cannot be reached, or a task failed: one line saying which."""


def _why(exc: BaseException) -> str:
    """One line for a failed task: the task's own exception where Ray kept it (the first line of Ray's message
    names only the task and its process, in terminal colours)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return one_line(cause, with_type=True)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _ray():
    try:
        import ray
    except ImportError:
        raise DistributedError("--workers and --ray-address need Ray: pip install 'pvq[distributed]'") from None
    return ray


def _open(source: str, trust_remote_code: bool = False):
    """(skeleton, checkpoint reader, a pristine copy of its blocks) of the safetensors folder `source`,
    built once per worker process (by the code the folder carries, with trust_remote_code)."""
    if source not in _worker_models:
        from .models.loading import load_skeleton

        model, _, reader = load_skeleton(source, trust_remote_code)
        _worker_models[source] = (model, reader, copy.deepcopy(blocks(model)))
    return _worker_models[source]


def _fault(index: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec:
        want, _, marker = spec.partition(":")
        if int(want) == index and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(9)  # as a kill -9 would: no cleanup, no reply


def _import_code(source: str) -> None:
    """Make the modeling code that `source` (a folder or hub id) carries importable in this worker, before
    any task's arguments are unpickled: a block of such a family is pickled as an instance of a class in
    transformers' module cache (transformers_modules...), which a fresh worker process neither has on its
    path nor, on another machine, on its disk. Ray runs this in every worker as it starts."""
    from transformers.dynamic_module_utils import init_hf_modules

    from .models.loading import _checked_config
    from .models.streaming import skeleton

    init_hf_modules()  # the module cache on sys.path
    _, config = _checked_config(source, trust_remote_code=True)
    skeleton(config, trust_remote_code=True)  # fetches and imports the model's classes (parameters on meta)


def _importer(source: str):
    """_import_code of `source` as a function of no arguments with a name (what Ray's setup hook must be)."""
    def import_code() -> None:
        _import_code(source)
    return import_code


def _warm(source: str | None, trust_remote_code: bool = False) -> None:
    torch.set_num_threads(1)
    from .models.loading import streamable
    from .models.streaming import NotStreamable

    if streamable(source):  # a checkpoint the workers read themselves; otherwise blocks come with their tasks
        try:
            _open(source, trust_remote_code)
        except NotStreamable:  # the driver loads it whole and sends the blocks
            pass


def quantize_block_task(source: str | None, cfg_dict: dict, index: int, prefix: str, specs: dict,
                        block=None, trust_remote_code: bool = False) -> tuple[dict, dict, dict]:
    """(stored tensors, quantization_config entries, relative errors) of block `index`, data-free, each
    linear with the codec setting `specs` gives it (chosen once by the driver, not again by every worker).
    `block`: the float block itself (a model the driver loaded whole), or None: read it from `source` (built
    by the code it carries, with trust_remote_code)."""
    torch.set_num_threads(1)
    _fault(index)
    cfg = QuantConfig(**{**cfg_dict, "overrides": {**(cfg_dict.get("overrides") or {}), **specs}})
    if block is None:
        model, reader, pristine = _open(source, trust_remote_code)
        layers = blocks(model)
        layers[index] = block = copy.deepcopy(pristine[index])  # a retried task starts from the unread block
        materialize(model, reader, lambda n: n.startswith(prefix))
    with torch.no_grad():
        done, err = api.quantize_block(block, prefix, cfg, {}, None, [])
    tensors = {prefix + k: t for k, t in stored_tensors(block, DENSE_DTYPES[cfg.dense_dtype]).items()}
    release(block)
    return tensors, done, err


def hessian_task(block, hidden: torch.Tensor, kwargs: dict, cfg_dict: dict, index: int, reference=None,
                 carried: dict | None = None, ref_carried: dict | None = None):
    """(leaders, Hessian accumulators) of one calibration shard through the float block `index`; with
    `reference` (--asymmetric: the unquantized stream on the shard's paired samples), ((leaders, Hessian
    accumulators, cross accumulators), the block's outputs on reference, what the reference stream carries
    after the block), three results (Ray's num_returns=3): the outputs and what they carry stay in the object
    store as the shard's unquantized stream for the next block. carried, ref_carried: what each stream carries
    to this block from earlier ones, for the shard's samples (adapters.carry)."""
    torch.set_num_threads(1)
    _fault(index)
    cfg = QuantConfig(**cfg_dict)
    kw = with_carried(kwargs, carried or {})
    with torch.no_grad(), api.calibration_precision(cfg, hidden):
        if reference is None:
            lead, accs, _ = block_hessian_sums(block, hidden, kw)
            return lead, accs
        written: dict = {}
        lead, accs, crosses, _, ref_out = block_input_sums(block, hidden, kw, reference=reference,
                                                           ref_kwargs=with_carried(kwargs, ref_carried or {}),
                                                           ref_written=written)
    return (lead, accs, crosses), ref_out, carried_after(ref_carried or {},
                                                         held_of(written, index, reference.shape[0]))


def solve_task(full: str, weight: torch.Tensor, bias, cfg_dict: dict, h, index: int, threads: int = 1, c=None):
    """(QuantLinear, quantization_config entry, relative error) of one linear (api.quantize_linear), on
    `threads` threads (the CPUs Ray gave the task); `c`: its cross moments (--asymmetric), which move the
    weight it aims at first, as api.quantize_linears does."""
    torch.set_num_threads(threads)
    _fault(index)
    cfg = QuantConfig(**cfg_dict)
    with torch.no_grad():
        return api.quantize_linear(full, api.aimed_weight(weight, h, c, cfg), bias, cfg, h, owned=True)


def advance_task(block, made: dict, hidden: torch.Tensor, kwargs: dict, cfg_dict: dict,
                 save: str | None = None, carried: dict | None = None, index: int | None = None):
    """(One shard's outputs of the quantized block: the next block's inputs for that shard, what the shard's
    stream carries after the block), two results (Ray's num_returns=2). carried: what it carries to the block
    (adapters.carry). `save`: a file of the writer's resume checkpoint to write both to as well, where this
    node sees its folder."""
    torch.set_num_threads(1)
    cfg = QuantConfig(**cfg_dict)
    written: dict = {}
    with torch.no_grad(), api.calibration_precision(cfg, hidden):
        out = api.run_as_quantized(block, made, hidden, with_carried(kwargs, carried or {}), written=written)
    onward = carried_after(carried or {}, held_of(written, index, hidden.shape[0]))
    if save is not None and os.path.isdir(os.path.dirname(save)):
        save_activations(out, Path(save), onward)
    return out, onward


def solve_cost(rows: int, cols: int) -> int:
    """About the work of one linear's solve: the Hessian's factorisation (cols^3) and the column updates
    (rows x cols^2)."""
    return cols ** 2 * (cols + rows)


def solve_threads(costs: dict, cpus: int, node_cpus: int) -> dict:
    """Threads for each of a block's solves, run at once on `cpus` CPUs (at most `node_cpus` each: a task
    runs on one node): shares of the CPUs in proportion to their cost, at least one, so the longest solve,
    which the block waits for, gets the most. A solve's result does not depend on its thread count (the
    same bytes as one process: tests/test_distributed.py)."""
    total = sum(costs.values()) or 1
    return {n: max(1, min(node_cpus, round(cpus * c / total))) for n, c in costs.items()}


class Shards:
    """The calibration activations of a Hessian-method run, one object per shard in Ray's object store,
    and the per-block work on them (Pool.calibration makes one)."""

    def __init__(self, pool: "Pool", hidden: torch.Tensor, kwargs: list, cfg: QuantConfig, carried: dict | None = None):
        ray = self.ray = pool.ray
        self.pool, self.cfg_dict = pool, cfg.to_dict()
        self.acts = [ray.put(hidden[s:e].clone()) for s, e in shard_bounds(hidden.shape[0], cfg.calib_shards)]
        self.samples, self.shards = hidden.shape[0], cfg.calib_shards
        self.refs = [None] * len(self.acts)  # --asymmetric: per shard, the unquantized stream on its paired samples
        # per shard, what each stream carries from block to block (adapters.carry; a resumed run's from its file)
        self.carried = [ray.put(cut_carried(carried or {}, s, e))
                        for s, e in shard_bounds(hidden.shape[0], cfg.calib_shards)]
        self.ref_carried = [None] * len(self.acts)
        # per shard where a block's arguments hold token ids (adapters.PerToken): those of the shard's samples
        bounds = shard_bounds(hidden.shape[0], cfg.calib_shards)
        self.kwargs = [[ray.put(samples_of(kw, s, e)) for s, e in bounds] if per_token(kw)
                       else [ray.put(kw)] * len(bounds) for kw in kwargs]

    def pair(self, reference: torch.Tensor, carried: dict | None = None) -> None:
        """Carry the unquantized model's stream (--asymmetric: the inputs of the next block to quantize, on the
        first reference.shape[0] samples, and what it carries to that block) beside the quantized one, each
        shard's paired samples with it."""
        bounds = paired_bounds(self.samples, reference.shape[0], self.shards)
        self.refs = [None if b is None else self.ray.put(reference[b[0]:b[1]].clone()) for b in bounds]
        self.ref_carried = [None if b is None else self.ray.put(cut_carried(carried or {}, *b)) for b in bounds]

    def held(self) -> dict:
        """What the quantized stream carries after the last quantize_block, every shard's fetched here."""
        return join_carried([self._get(c, f"calibration shard {j}") for j, c in enumerate(self.carried)])

    def _get(self, ref, what: str):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            raise DistributedError(f"{what}: {_why(exc)}") from None

    def quantize_block(self, block, index: int, prefix: str, bar, uncalibrated: list, saves: list | None = None):
        """(QuantLinear by linear name, entries, errors) of block `index`, its shards' activations moved on
        through the quantized block (and written to `saves`, one file per shard, where a worker sees them)."""
        ray, pool = self.ray, self.pool
        block_ref = ray.put(block)
        parts, refs = [], []  # a paired shard's task also gives its unquantized outputs, kept in the object store
        for j, (a, r, kw) in enumerate(zip(self.acts, self.refs, self.kwargs[index])):
            if r is None:
                parts.append(pool._hess.remote(block_ref, a, kw, self.cfg_dict, index, None, self.carried[j]))
                refs.append(None)
            else:
                sums, out, self.ref_carried[j] = pool._hess.options(num_returns=3).remote(
                    block_ref, a, kw, self.cfg_dict, index, r, self.carried[j], self.ref_carried[j])
                parts.append(sums)
                refs.append(out)

        def sums():  # fetched one shard at a time, in shard order
            for j, (part, r) in enumerate(zip(parts, refs)):
                got = self._get(part, f"block {index}: Hessians of calibration shard {j}")
                yield got if r is not None else (*got, None)
        hess, cross = merge_asymmetric(sums())
        self.refs = refs
        del parts
        stored, pending = {}, {}
        linears = block_linears(block)
        uncalibrated += [prefix + name for name in linears if name not in hess]
        # the longest solves first: the last task to start is then a short one
        costs = {n: solve_cost(linears[n].out_features, linears[n].in_features) for n in linears}
        order = sorted(linears, key=lambda n: -costs[n])
        threads = solve_threads(costs, pool.workers(), pool.node_cpus())
        for name in order:
            mod = linears[name]
            full = prefix + name
            h, c = hess.get(name), cross.get(name)
            for m in (h, c):  # a Hessian (or cross moments) shared by several linears travels once
                if m is not None and id(m) not in stored:
                    stored[id(m)] = ray.put(m)
            ref = pool._solve.options(num_cpus=threads[name]).remote(
                full, mod.weight.detach(), mod.bias, self.cfg_dict, None if h is None else stored[id(h)], index,
                threads[name], None if c is None else stored[id(c)])
            pending[ref] = name
        del hess, cross, stored
        results, waiting = {}, list(pending)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            results[pending[ready[0]]] = self._get(ready[0], f"block {index}: linear {pending[ready[0]]}")
            if bar is not None:
                bar.update(1)
        made, per_layer, errors = {}, {}, {}
        for name in block_linears(block):  # in the block's order, whatever order they finished in
            made[name], per_layer[prefix + name], errors[prefix + name] = results[name]
        made_ref = ray.put(made)
        moved = [pool._advance.options(num_returns=2).remote(block_ref, made_ref, a, self.kwargs[index][j],
                                                             self.cfg_dict, None if saves is None else str(saves[j]),
                                                             self.carried[j], index)
                 for j, a in enumerate(self.acts)]
        self.acts, self.carried = [m[0] for m in moved], [m[1] for m in moved]
        return made, per_layer, errors

    def outputs(self) -> torch.Tensor:
        """The activations the last quantize_block left, every shard's fetched here in sample order."""
        return torch.cat([self._get(r, f"calibration shard {j}") for j, r in enumerate(self.acts)])

    def checkpoint(self, saves: list) -> "list[str] | torch.Tensor":
        """The resume checkpoint of the activations the last quantize_block wrote to `saves`: the names of
        those files once every shard's is there, or, where a worker could not see the writer's folder
        (another machine's disk), every shard's activations fetched here in sample order."""
        self.ray.wait(self.acts, num_returns=len(self.acts), fetch_local=False)
        if not all(os.path.isfile(f) for f in saves):  # a failed task is raised here, in one line
            return self.outputs()
        return [Path(f).name for f in saves]


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once a cluster address nothing listens on (Ray itself waits minutes for it)."""
    if address == "auto":  # the cluster this machine's `ray start` joined: Ray finds it
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise DistributedError(f"--ray-address {address!r}: expected HOST:PORT (the head node's `ray start` address)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise DistributedError(f"cannot reach the Ray cluster at {address!r}: {exc.strerror or exc}") from None


class Pool:
    """A Ray runtime to quantize on: `workers` local worker processes, or the cluster at `address`.
    `code_from`: the folder or hub id of a model whose own modeling code the run trusts (--trust-remote-code):
    every worker imports it as it starts (the folder at a path every node sees)."""

    def __init__(self, workers: int | None = None, address: str | None = None, code_from: str | None = None):
        ray = _ray()
        self.ray, self.code_from = ray, code_from
        env = {} if code_from is None else {"runtime_env": {"worker_process_setup_hook": _importer(code_from)}}
        if address is not None:
            check_reachable(address)
        try:
            if address is not None:
                ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False, **env)
            else:
                # "local": a runtime of our own, even where a cluster this machine joined is running
                ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level="ERROR",
                         log_to_driver=False, **env)
        except Exception as exc:  # ConnectionError, a bad address, a runtime that cannot start
            where = f"the Ray cluster at {address!r}" if address else f"a local Ray runtime with {workers} workers"
            raise DistributedError(f"cannot start {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self._task = ray.remote(num_cpus=1, max_retries=RETRIES)(quantize_block_task)
        self._hess = ray.remote(num_cpus=1, max_retries=RETRIES)(hessian_task)
        self._solve = ray.remote(num_cpus=1, max_retries=RETRIES)(solve_task)
        self._advance = ray.remote(num_cpus=1, max_retries=RETRIES)(advance_task)

    def workers(self) -> int:
        return int(self.ray.cluster_resources().get("CPU", 0))

    def node_cpus(self) -> int:
        """The most CPUs one node of the runtime has (what one task can be given)."""
        return max([int(n["Resources"].get("CPU", 0)) for n in self.ray.nodes() if n.get("Alive")] or [1]) or 1

    def warm(self, source: str | None) -> None:
        """Have every worker open `source` now (imports, the model), while this process still checks and
        plans: the first blocks then start at once. Nothing is waited for here."""
        opener = self.ray.remote(num_cpus=1, max_retries=RETRIES)(_warm)
        self._warming = [opener.remote(source, self._trusts(source)) for _ in range(max(self.workers(), 1))]

    def _trusts(self, source: str | None) -> bool:
        """Whether workers may run the code `source` carries (the run's --trust-remote-code model)."""
        return source is not None and source == self.code_from

    def quantize_blocks(self, model, source: str | None, cfg: QuantConfig, indices):
        """Yield (index, (tensors, entries, errors)) for every block of `indices` of `model`, in that order.

        A block still on the meta device (a streamed skeleton) is read by its worker from `source`; one in
        memory travels with its task. A few tasks per worker are in flight at a time, so a model loaded
        whole is not copied to Ray's object store all at once."""
        cfg_dict = cfg.to_dict()
        layers = blocks(model)
        ahead = 2 * max(self.workers(), 1)
        todo, pending = list(indices), []
        while todo or pending:
            while todo and len(pending) < ahead:
                i = todo.pop(0)
                prefix = block_prefix(model, i)
                specs = {prefix + name: spec_to_dict(api.layer_spec(cfg, prefix + name, *lin.weight.shape))
                         for name, lin in block_linears(layers[i]).items()}
                streamed = any(p.device.type == "meta" for p in layers[i].parameters())
                pending.append((i, self._task.remote(source, cfg_dict, i, prefix, specs,
                                                     None if streamed else layers[i], self._trusts(source))))
            i, ref = pending.pop(0)
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                raise DistributedError(f"block {i}: {_why(exc)}") from None
            yield i, result

    def calibration(self, hidden: torch.Tensor, kwargs: list, cfg: QuantConfig, carried: dict | None = None
                    ) -> Shards:
        """The calibration activations `hidden` (block 0's inputs, or a resumed run's) cut into
        cfg.calib_shards shards and put in the object store; `kwargs`: each block's call arguments; `carried`:
        what the blocks a resumed run finished carry to later ones (adapters.carry)."""
        return Shards(self, hidden, kwargs, cfg, carried)

    def close(self) -> None:
        self.ray.shutdown()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
