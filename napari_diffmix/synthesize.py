"""Batch synthesis: a label plan rendered by the diffusion model into a resumable zarr store.

Pipeline: dataset + class scheme + model -> :class:`~napari_diffmix.mixing.Plan` (balanced set
planner) -> label maps (:func:`~napari_diffmix.mixing.make_item`: balancing / enlarging per
item) -> images (batched sampling with the fast sampler; by default DiffMix's SDEdit from the
original patch, optionally from pure noise) -> the store of :mod:`napari_diffmix.store`.

Driving a job
-------------
``job = SynthesisJob(dataset, plan, model, out, config)`` then either

* ``job.run(pbar=None, should_stop=None) -> SynthesisResult``: the CLI way. A tqdm bar (items/s,
  ETA) or the caller's ``pbar``; Ctrl-C / SIGTERM (main thread only) and ``should_stop()``
  stop within one network pass (the sampler polls between UNet stages) and return with
  ``result.stopped``: finished batches stay, the batch being rendered is dropped and rendered
  again on resume (a second Ctrl-C aborts at once, the store still resumable).
* ``for event in job.events(should_stop=None): ...``: the GUI way (napari's batch export
  widget drains it in a ``thread_worker``). Events (:class:`~napari_diffmix.progress.JobEvent`,
  ``done``/``total`` counting the store's items): one ``"progress"`` at the start (the items
  this process renders are ``job.pending``), a ``"preview"`` per denoising step of the current
  batch (with the sampler's :class:`~napari_diffmix.model.samplers.StepRecord`), an ``"item"``
  when a batch is rendered (its :class:`RenderedBatch`; it is written by a background thread
  while the next batch samples), and ``"done"`` once every write has landed. Closing the
  generator (cancel) abandons the batch being sampled and waits for the one being written;
  the store stays consistent and resumable.

Resume and crash safety
-----------------------
Items are grouped in fixed batches (``batch_size`` consecutive plan items) whatever the number
of processes, each item's sampling noise comes from its own seed (derived from ``seed`` and
the item index) and its label map from the plan alone, so any item renders identically in any
run. A batch is written item arrays first and ``done`` flags last (see
:func:`napari_diffmix.store.write_items`); a re-run of the same command finds the store,
checks that it was made with the same settings (``fingerprint``) and renders only the batches
that still have unfinished items. A store made with other settings is refused unless
``overwrite``.

Several processes
-----------------
Under ``torchrun --nproc_per_node=N`` (gloo on CPU, NCCL on GPUs; one GPU per rank) rank ``r``
renders batches ``r, r + N, r + 2N, ...`` and writes its own chunks of the same store (every
array, ``done`` included, is chunked per item, so ranks never share a chunk). Rank 0 creates
the store before the others open it and writes the final attributes after all ranks finish.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from . import __version__
from .classes import ClassScheme
from .datasets import LAYOUTS, Dataset, patch_grid
from .errors import CheckpointError, DatasetError, DiffMixError, RenderError, SchemeError, StoreError
from .export import write_training_files
from .mixing import MixCache, Plan, make_item
from .model.checkpoint import ModelInfo
from .model.samplers import DIFFMIX_SETTINGS, FAST_SETTINGS, TIMESTEP_SPACING
from .outputs import WriterLock, check_replace, output_kind, refuse_overlap
from .progress import JobEvent, StopRequests, progress_bar
from .render import Renderer, check_synthesis_memory, estimate_synthesis_memory, out_of_memory
from .store import DONE, ORIGINALS, create_store, original_patches, read_done, remove_partial_files, update_attrs, write_items

log = logging.getLogger(__name__)

INIT_MODES = ("original", "noise")
ORIGINALS_MODES = ("auto", "include", "reference", "none")
# Seed-derivation domain of the sampling noise (the label plan uses its own domains).
_NOISE_STREAM = 3


@dataclass(frozen=True)
class SynthesisConfig:
    """How label maps become images, and what the store carries.

    ``sampler``/``steps``: the solver and its respaced steps (default: the samplers' fast
    settings, DPM-Solver++(2M) with 15 steps).
    ``guidance``: CFG scale (None: the model's stored default). ``init``: "original" starts
    from the original patch noised to ``strength`` of the schedule (DiffMix's SDEdit, 0.55
    published) and runs ``floor(strength * steps)`` steps; "noise" samples from pure noise.
    ``seed``: base of the per-item noise seeds. ``batch_size``: items per sampler call (fixed
    batches of consecutive items). ``originals``: "include" copies the original grid patches
    into the store, "reference" records the dataset they come from, "auto" references a
    dataset on disk and includes otherwise, "none" leaves them out. ``precision``: the
    network's ("auto": bf16 where the hardware has it, see
    :func:`~napari_diffmix.runtime.resolve_precision`); each item's provenance records
    the one used.
    """

    sampler: str = FAST_SETTINGS["sampler"]
    steps: int = FAST_SETTINGS["steps"]
    guidance: float | None = None
    init: str = "original"
    strength: float = DIFFMIX_SETTINGS["strength"]
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"
    originals: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        from .model.samplers import SAMPLERS
        from .runtime import PRECISIONS

        if self.sampler not in SAMPLERS:
            raise DiffMixError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.init not in INIT_MODES:
            raise DiffMixError(f"init must be 'original' (SDEdit from the original patch) or 'noise', got {self.init!r}")
        if self.originals not in ORIGINALS_MODES:
            raise DiffMixError(f"originals must be one of {', '.join(ORIGINALS_MODES)}, got {self.originals!r}")
        if self.precision not in PRECISIONS:
            raise DiffMixError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DiffMixError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DiffMixError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.init == "original":
            if not 0.0 < self.strength <= 1.0:
                raise DiffMixError(f"strength must be in (0, 1], got {self.strength!r}")
            if math.floor(self.strength * self.steps + 1e-9) < 1:
                raise DiffMixError(
                    f"strength {self.strength} of {self.steps} steps leaves no denoising step; raise --steps or --strength"
                )
        if self.guidance is not None and not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise DiffMixError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if self.threads is not None and self.threads < 1:
            raise DiffMixError(f"threads must be >= 1, got {self.threads}")


def item_seed(seed: int, index: int) -> int:
    """The sampling-noise seed of plan item ``index`` (independent of batches and ranks)."""
    state = np.random.SeedSequence([int(seed), _NOISE_STREAM, int(index)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))  # torch seeds are signed 64-bit


@dataclass
class RenderedBatch:
    """The data of an ``"item"`` event: the batch's images and label maps, as written."""

    images: np.ndarray
    inst_maps: np.ndarray
    type_maps: np.ndarray


@dataclass
class SynthesisResult:
    """Summary of a run. ``timings`` (seconds, this process): labels (maps, conditions, init
    crops), sampling, writing, total."""

    store: Path
    total: int
    done: int
    rendered: int
    stopped: bool
    complete: bool
    counts: dict[str, list[int]]
    timings: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    signal: str | None = None  # "SIGINT" / "SIGTERM" when a signal asked the run to stop

    @property
    def exit_code(self) -> int:
        """The command's exit status: 0 complete (or stopped on request of a caller), 128 + the
        signal number when a signal left the store unfinished, 1 when items are missing otherwise."""
        import signal

        if self.complete:
            return 0
        if self.signal is not None:
            return 128 + int(getattr(signal, self.signal))
        return 0 if self.stopped else 1

    @property
    def items_per_s(self) -> float:
        return self.rendered / self.timings["total"] if self.timings.get("total") else 0.0


class _Tiles:
    """Dataset view that keeps the last few tiles loaded (plan items come grouped by tile)."""

    def __init__(self, dataset: Sequence[Any], keep: int = 4):
        self.dataset = dataset
        self.keep = keep
        self._lru: OrderedDict[int, Any] = OrderedDict()

    def __getitem__(self, t: int) -> Any:
        if t in self._lru:
            self._lru.move_to_end(t)
            return self._lru[t]
        tile = self.dataset[t]
        self._lru[t] = tile
        while len(self._lru) > self.keep:
            self._lru.popitem(last=False)
        return tile


class _Writer:
    """Writes one batch in a background thread while the next one samples.

    At most one write is in flight: :meth:`submit` first waits for the previous one (and
    re-raises its error, e.g. a full disk). Leaving the ``with`` block waits for the last
    write, so a stopped or cancelled job never leaves a write behind.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffmix-store-writer")
        self._pending = None

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args, **kwargs)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping) and key != "plan":
            out += _differences(a, b, f"{prefix}{key}.")
        elif key == "plan":
            out.append(f"{prefix}plan (other items or label settings)")
        else:
            out.append(f"{prefix}{key}: store has {a!r}, this run {b!r}")
    return out


def original_origins(plan: Plan) -> list[tuple[int, int, int]]:
    """``(tile, y, x)`` of the original grid patches the plan counted (tiles too small skipped)."""
    out = []
    for t, (h, w) in enumerate(plan.tile_shapes):
        if h >= plan.patch_size and w >= plan.patch_size:
            out += [(t, y, x) for y, x in patch_grid(h, w, plan.patch_size, plan.stride)]
    return out


def check_model_fits(info: ModelInfo, scheme: ClassScheme, patch_size: int) -> None:
    """Refuse a model (its :class:`~napari_diffmix.model.checkpoint.ModelInfo`) that cannot render
    ``patch_size`` px patches of ``scheme``'s classes. Cheap, so that callers can run it before
    planning, which takes a while for a large dataset; :class:`SynthesisJob` runs it too."""
    model_names, names = list(info.scheme.names), list(scheme.names)
    if model_names != names:
        raise SchemeError(
            f"model {info.source} was trained on scheme {info.scheme.name!r} with classes {model_names}, "
            f"but the dataset uses scheme {scheme.name!r} with classes {names}; use a model trained on this "
            "dataset's classes (or open the dataset with the model's scheme)"
        )
    factor, halvings = info.config.size_multiple, len(info.config.channel_mult) - 1
    if patch_size % factor:
        raise CheckpointError(
            f"{info.source}: the model halves the resolution {halvings} time{'s' if halvings != 1 else ''}, so patches "
            f"must be a multiple of {factor} px; the patches are {patch_size} px"
        )


def dataset_reference(dataset: Any, relative_to: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """How to reopen ``dataset`` with :func:`~napari_diffmix.datasets.open_dataset`, or None.

    The path is relative to ``relative_to`` (the store's folder) when the dataset lies inside
    it, so a folder holding both can be moved; otherwise absolute.
    """
    layout = getattr(dataset, "layout", None)
    root = getattr(dataset, "root", None)
    if layout not in LAYOUTS or root is None or not Path(root).is_dir():
        return None
    root = Path(root).resolve()
    if relative_to is not None:
        base = Path(relative_to).resolve()
        if base in root.parents:
            return {"path": os.path.relpath(root, base), "layout": layout, "relative_to_store_folder": True}
    return {"path": str(root), "layout": layout}


@dataclass
class StoreCheck:
    """What :func:`verify_store` found: ``problems`` maps the index of each finished item that
    fails to its reason (``original_problems`` the same for included originals)."""

    path: Path
    total: int
    done: int
    problems: dict[int, str]
    original_problems: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.original_problems

    def summary(self, limit: int = 10) -> str:
        lines = [f"{self.path}: {self.done} of {self.total} items finished; "
                 + ("every finished item verified" if self.ok else
                    f"{len(self.problems) + len(self.original_problems)} damaged (re-run the synthesis command to render them again)")]
        for label, problems in (("item", self.problems), ("original", self.original_problems)):
            for i, why in list(problems.items())[:limit]:
                lines.append(f"  {label} {i}: {why}")
            if len(problems) > limit:
                lines.append(f"  ... and {len(problems) - limit} more {label}(s)")
        return "\n".join(lines)


# Provenance fields of a synthetic item that must equal the store's sampling settings.
_SAMPLING_FIELDS = ("sampler", "steps", "spacing", "guidance", "init", "strength")


def _item_problem(store: Any, i: int, sampling: Mapping[str, Any] | None) -> str | None:
    from .nuclei import inst_types_from_maps, type_map_from

    try:
        item = store.item(i)
    except StoreError as exc:
        return getattr(exc, "reason", str(exc))
    prov = item.provenance
    if not isinstance(prov, dict) or prov.get("index") != i:
        return f"its provenance names item {prov.get('index') if isinstance(prov, dict) else prov!r}"
    try:
        consistent = np.array_equal(item.type_map, type_map_from(item.inst_map, inst_types_from_maps(item.inst_map, item.type_map)))
    except DiffMixError as exc:
        return f"its label maps break the contract ({exc})"
    if not consistent:
        return "its type_map gives some nucleus more than one class"
    if sampling is not None and store.kind == "synthetic":
        for key in _SAMPLING_FIELDS:
            if key in sampling and prov.get(key) != sampling[key]:
                return f"rendered with {key} {prov.get(key)!r}, the store's settings say {sampling[key]!r}"
        if "seed" in sampling and prov.get("seed") != item_seed(sampling["seed"], i):
            return "rendered with another seed than the store's settings give it"
    return None


def verify_store(path: str | os.PathLike, *, pbar: Any | None = None) -> StoreCheck:
    """Decode every finished item of the store at ``path`` and check it: all three chunks
    present and readable, label maps consistent, provenance of this item and of the store's
    sampling settings (steps, sampler, guidance, strength, seed, ...). Included originals are
    checked the same way, less the sampling. A store that cannot be opened raises StoreError."""
    from .store import open_store

    store = open_store(path)
    sampling = (store.attrs.get("settings") or {}).get("sampling")
    parts = [(store, sampling)] + ([(store.originals, None)] if store.originals is not None else [])
    masks = [part.done_mask() for part, _ in parts]
    found: list[dict[int, str]] = []
    with progress_bar(pbar, int(sum(m.sum() for m in masks)), "verify", unit="item") as bar:
        for (part, settings), done in zip(parts, masks):
            problems = {}
            for i in np.flatnonzero(done):
                why = _item_problem(part, int(i), settings)
                if why is not None:
                    problems[int(i)] = why
                bar.update(1)
            found.append(problems)
    return StoreCheck(Path(path), len(store), int(masks[0].sum()), found[0], found[1] if len(found) > 1 else {})


def check_store_out(out: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = ()) -> None:
    """Refuse a store path that is one of ``inputs``, inside one or holds one, or that holds
    anything but a store or nothing: ``overwrite`` replaces only stores, never other folders."""
    refuse_overlap(out, inputs)
    if output_kind(out) != "store":
        check_replace(out, False, ["store"])


class SynthesisJob:
    """Render every item of ``plan`` into the store at ``out``; see the module docstring.

    ``dataset``: the :class:`~napari_diffmix.datasets.Dataset` the plan was made from (its
    images seed SDEdit and the original patches). ``model``: a model file path (loaded with
    :func:`~napari_diffmix.model.checkpoint.load_model`; an official guided-diffusion ``.pt``
    needs its architecture ``preset``) or a ``(SDMUNet, ModelInfo)`` pair.
    ``overwrite`` replaces a store made with other settings (a store with the same settings is
    always resumed: its finished items are exactly what a fresh run would write); ``resume``
    insists on continuing an existing store (an error if there is none). ``created_by`` is
    recorded in the store; ``cache``: the :class:`~napari_diffmix.mixing.MixCache` the plan was
    made with, so that tiles and donors are not read again; ``model_info``: the model file's
    :class:`~napari_diffmix.model.checkpoint.ModelInfo` when the caller has already read it
    (:func:`~napari_diffmix.model.checkpoint.read_info` hashes the whole file: seconds for an
    official 2.6 GB ``.pt``). ``renderer``: the :class:`~napari_diffmix.render.Renderer` that
    loads the model and makes its sampler (pass one to keep the model loaded across jobs).
    """

    def __init__(
        self,
        dataset: Dataset,
        plan: Plan,
        model: str | os.PathLike | tuple[Any, Any],
        out: str | os.PathLike,
        config: SynthesisConfig | None = None,
        *,
        overwrite: bool = False,
        resume: bool = False,
        created_by: str = "synthesize",
        cache: MixCache | None = None,
        preset: str | None = None,
        model_info: ModelInfo | None = None,
        scorer: Any = None,
        min_fidelity: float | None = None,
        renderer: Renderer | None = None,
    ):
        self.dataset = dataset
        # Label fidelity (napari_diffmix.fidelity.Scorer): each batch is scored as it is written.
        self.scorer = scorer
        self.min_fidelity = min_fidelity
        self.cache = cache if cache is not None else MixCache(dataset)
        self.plan = plan
        self.out = Path(out)
        self.config = config or SynthesisConfig()
        self.overwrite = overwrite
        self.resume = resume
        self.created_by = created_by
        # A caller that renders again and again (the batch export widget) passes its own, so the
        # model stays loaded between jobs.
        self.renderer = renderer if renderer is not None else Renderer()
        self.model = None
        self._model_path = None
        self.preset = preset
        if isinstance(model, tuple):
            if preset is not None or model_info is not None:
                raise CheckpointError("preset and model_info are for a model file; a loaded model carries its own")
            self.model, self.info = model
        else:
            self._model_path = Path(model)
            if model_info is None:
                from .model.checkpoint import read_info

                model_info = read_info(model, preset=preset)
            elif Path(model_info.source).resolve() != self._model_path.resolve():
                raise CheckpointError(f"model_info describes {model_info.source}, not the model file {model}")
            self.info = model_info
        self.info.check_sampling(self.config.sampler, self.config.steps, self.config.guidance)
        self.result: SynthesisResult | None = None
        self.precision: str | None = None  # the network precision "auto" resolved to, once running
        self.pending = 0  # items this process renders, once running
        check_store_out(self.out, [getattr(dataset, "root", None), self._model_path])
        self._check_inputs()
        check_model_fits(self.info, self.scheme, self.plan.patch_size)

    # -- validation ----------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        plan, scheme = self.plan, self.dataset.scheme
        if list(plan.scheme.names) != list(scheme.names):
            raise SchemeError(f"the plan uses classes {list(plan.scheme.names)} but the dataset {list(scheme.names)}")
        if len(plan) == 0:
            raise DatasetError("the plan has no items: nothing to synthesize" + ("" if plan.reached else f" ({plan.reason})"))
        names = list(getattr(self.dataset, "names", []))
        if names != list(plan.tile_names):
            raise DatasetError(f"the plan was made for tiles {list(plan.tile_names)[:5]}..., the dataset has {names[:5]}...")
        self.scheme: ClassScheme = scheme
        mode = self.config.originals
        self.reference = dataset_reference(self.dataset, self.out.parent)
        if mode == "auto":
            mode = "reference" if self.reference is not None else "include"
        if mode == "reference" and self.reference is None:
            raise DatasetError(
                "the original patches can only be referenced for a dataset folder on disk; use originals='include' "
                "(--include-originals) or 'none'"
            )
        self.originals_mode = mode
        needs_images = self.config.init == "original" or mode == "include"
        first = self.dataset[plan.items[0].tile]
        if needs_images and first.image is None:
            why = "SDEdit starts from the original patches" if self.config.init == "original" else "included originals need images"
            raise DatasetError(
                f"tile {first.name!r} has no image, but {why}; give a dataset with images, or sample from noise "
                "(--from-noise) and leave the originals out or referenced", first.source,
            )

    @property
    def guidance(self) -> float:
        if self.config.guidance is not None:
            return float(self.config.guidance)
        return float(self.info.default_guidance)

    def settings(self) -> dict[str, Any]:
        """Everything that decides the store's content (its ``fingerprint`` is their hash)."""
        c = self.config
        return {
            "plan": self.plan.to_dict(),
            "patch_size": self.plan.patch_size,
            "scheme": self.scheme.to_dict(),
            "model_sha256": self.info.sha256,
            "sampling": {
                "sampler": c.sampler, "steps": c.steps, "spacing": TIMESTEP_SPACING[c.sampler],
                "guidance": self.guidance, "init": c.init,
                "strength": c.strength if c.init == "original" else None, "seed": c.seed, "cfg": "batched",
            },
            "originals": self.originals_mode,
        }

    # -- store ---------------------------------------------------------------------------------
    def _attrs(self, settings: Mapping[str, Any], fingerprint: str) -> dict[str, Any]:
        import torch
        import zarr

        info = self.info
        origins = original_origins(self.plan)
        return {
            "scheme": self.scheme.to_dict(),
            "fingerprint": fingerprint,
            "settings": dict(settings),
            "model": {
                "sha256": info.sha256, "source": info.source, "format": info.format, "config": info.config.to_dict(),
                "diffusion": info.diffusion, "default_guidance": info.default_guidance,
            },
            "dataset": {
                **(self.reference or {}), "tiles": list(self.plan.tile_names),
                "scheme": self.scheme.name, "root": str(getattr(self.dataset, "root", "") or ""),
            },
            "originals": {
                "mode": {"include": "included", "reference": "referenced", "none": "none"}[self.originals_mode],
                "patches": [list(o) for o in origins], "patch_size": self.plan.patch_size, "stride": self.plan.stride,
            },
            "software": {"napari_diffmix": __version__, "torch": torch.__version__, "zarr": zarr.__version__},
            "class_counts": {
                "classes": ["background", *self.scheme.names],
                "before": [int(v) for v in self.plan.original_counts],
                "planned": [int(v) for v in self.plan.planned_counts],
            },
            "status": "in progress",
            "items_done": 0,
            "created_by": self.created_by,
        }

    def _open_or_create(self) -> str:
        """Rank 0: create the store or check it for resuming. Returns a message for the log."""
        import zarr

        settings = self.settings()
        fingerprint = _sha256_json(settings)
        if output_kind(self.out) != "store":
            check_store_out(self.out)
            if self.resume:
                raise StoreError(f"{self.out}: no store to resume; run without --resume to start it")
        else:
            try:
                attrs = dict(zarr.open_group(str(self.out), mode="r").attrs)
            except Exception as exc:
                raise StoreError(f"{self.out}: the store cannot be opened ({exc}); move it away or delete it to start again") from None
            if attrs.get("fingerprint") == fingerprint:
                removed = remove_partial_files(self.out)
                # Finished items that fail verification (a deleted or torn chunk, items of another
                # writer) are rendered again rather than trusted.
                check = verify_store(self.out)
                group = zarr.open_group(str(self.out), mode="r+")
                for part, problems in ((group, check.problems), (group[ORIGINALS] if ORIGINALS in group else None, check.original_problems)):
                    for i in problems:
                        part[DONE][i] = False
                done = check.done - len(check.problems)
                extra = f", removed {removed} partial chunk file(s) of an interrupted write" if removed else ""
                if not check.ok:
                    first = next(iter({**check.problems, **check.original_problems}.items()))
                    extra += (f"; {len(check.problems) + len(check.original_problems)} finished item(s) failed verification "
                              f"and are rendered again (e.g. item {first[0]}: {first[1]})")
                return f"resuming {self.out}: {done} of {len(self.plan)} items already done{extra}"
            elif not self.overwrite:
                diffs = _differences(attrs.get("settings") or {}, settings)
                raise StoreError(
                    f"{self.out}: the store was made with other settings ({'; '.join(diffs[:4]) or 'unknown'}); "
                    "pass --overwrite to replace it, or choose another --out"
                )
        origins = original_origins(self.plan) if self.originals_mode == "include" else []
        create_store(
            self.out, count=len(self.plan), shape=(self.plan.patch_size, self.plan.patch_size),
            attrs=self._attrs(settings, fingerprint), originals=len(origins), overwrite=True,
        )
        return f"created {self.out} for {len(self.plan)} items"

    def _write_originals(self, group: Any, should_stop: Callable[[], bool]) -> None:
        if self.originals_mode != "include":
            return
        sub = group[ORIGINALS]
        done = read_done(sub)
        if done.all():
            return
        origins = original_origins(self.plan)
        todo = np.flatnonzero(~done)
        for item in original_patches(self.dataset, [origins[k] for k in todo], self.plan.patch_size, indices=todo):
            write_items(sub, item.index, item.image[None], item.inst_map[None], item.type_map[None], [item.provenance],
                        where=str(self.out / ORIGINALS))
            if should_stop():
                return

    # -- the run -------------------------------------------------------------------------------
    def _setup(self) -> None:
        import torch

        from .runtime import setup_distributed

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.dist_info, self.device = setup_distributed(self.config.device)
        # Before the model loads: a batch that cannot fit is refused with the numbers, not
        # swapped through for hours or killed by the kernel part-way.
        on_device = self.model is not None and next(self.model.parameters()).device == self.device
        self.memory = check_synthesis_memory(estimate_synthesis_memory(
            self.info.config, self.plan.patch_size, self.config.batch_size, self.device, self.config.precision,
            weights_on_device=on_device,
        ))
        # The label-map SPADE cache gets what the estimate leaves free (the sampler's own default,
        # half of the free memory, could push a batch whose activations take the other half over).
        budget = self.memory.cache_budget
        if self.model is None:
            # self.info came from read_info (here or in the CLI): the file is hashed once per run.
            loaded = self.renderer.load(self._model_path, self.device, self.config.precision, self.preset,
                                        sha256=self.info.sha256, cache_max_bytes=budget)
        else:
            loaded = self.renderer.adopt(self.model.to(self.device), self.info, self.config.precision, cache_max_bytes=budget)
        self.sampler = loaded.runner
        self.model, self.info = self.sampler.model, loaded.info

    def _batches(self, done: np.ndarray) -> list[list[int]]:
        b, n = self.config.batch_size, len(self.plan)
        rank, world = self.dist_info.rank, self.dist_info.world_size
        out = []
        for k, start in enumerate(range(0, n, b)):
            idx = list(range(start, min(start + b, n)))
            if k % world == rank and not done[start : start + len(idx)].all():
                out.append(idx)
        return out

    def _labels(self, indices: Sequence[int], cache: MixCache, tiles: _Tiles):
        from .model.condition import condition_batch

        inst_maps, type_maps, provs, inits = [], [], [], []
        s = self.plan.patch_size
        for i in indices:
            inst_map, type_map, prov = make_item(self.plan, self.dataset, i, cache=cache)
            inst_maps.append(inst_map)
            type_maps.append(type_map)
            provs.append(prov)
            if self.config.init == "original":
                tile = tiles[prov["tile"]]
                if tile.image is None:
                    raise DatasetError(
                        f"tile {tile.name!r} has no image; SDEdit starts from the original patch. Give a dataset with "
                        "images, or sample from noise (--from-noise)", tile.source,
                    )
                y, x = prov["origin"]
                inits.append(tile.image[y : y + s, x : x + s])
        inst_maps, type_maps = np.stack(inst_maps), np.stack(type_maps)
        cond = condition_batch(inst_maps, type_maps, self.scheme.num_classes)
        return inst_maps, type_maps, provs, (np.stack(inits) if inits else None), cond

    def _provenance(self, label_prov: Mapping[str, Any], i: int, seed: int) -> dict[str, Any]:
        c = self.config
        out = dict(label_prov)
        out.update(
            kind="synthetic", index=i, label_seed=label_prov.get("seed"), seed=seed, sampler=c.sampler, steps=c.steps,
            spacing=TIMESTEP_SPACING[c.sampler],
            guidance=self.guidance, init=c.init, strength=c.strength if c.init == "original" else None,
            precision=self.precision,
        )
        return out

    def events(self, should_stop: Callable[[], bool] | None = None) -> Iterator[JobEvent]:
        """Run the job as a generator of :class:`~napari_diffmix.progress.JobEvent` (see the module docstring)."""
        import torch

        threads = torch.get_num_threads()
        self.dist_info = None
        self._lock = None
        try:
            yield from self._events(should_stop)
        finally:
            if self._lock is not None:
                self._lock.release()
            # A GUI process keeps running after the job: give back its thread setting and process group.
            torch.set_num_threads(threads)
            if self.dist_info is not None and self.dist_info.owns_group and _dist() is not None:
                _dist().destroy_process_group()

    def _events(self, should_stop: Callable[[], bool] | None) -> Iterator[JobEvent]:
        import zarr

        from .model.samplers import to_uint8

        should_stop = should_stop or (lambda: False)
        t_start = time.perf_counter()
        self._setup()
        info, dist = self.dist_info, _dist()
        message, error = "", None
        if info.is_main:
            try:
                # Held until the job ends: a second writer (another run, or --overwrite with other
                # settings) would otherwise mix its items into this store.
                self._lock = WriterLock(self.out).acquire()
                message = self._open_or_create()
            except DiffMixError as exc:
                error = exc
        if dist is not None:
            box = [None if error is None else (type(error).__name__, str(error))]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and error is None:
                error = StoreError(box[0][1])
        if error is not None:
            raise error
        if message:
            log.info(message)
        group = zarr.open_group(str(self.out), mode="r+")
        if info.is_main:
            self._write_originals(group, should_stop)
            if self.scorer is not None:
                from .fidelity import ensure_fidelity_array

                self.scorer.check_scheme(self.scheme, self.out)
                ensure_fidelity_array(group)
        if dist is not None:
            dist.barrier()  # originals and partial-file cleanup finish before any rank writes
        done = read_done(group)
        batches = self._batches(done)
        pending = sum(len(b) for b in batches)
        n_done, total = int(done.sum()), len(self.plan)
        self.message = message
        self.pending = pending
        yield JobEvent("progress", n_done, total, f"rendering {pending} item(s) into {self.out}")

        sampler = self.sampler
        self.precision = sampler.precision
        cache, tiles = self.cache, _Tiles(self.dataset)
        c = self.config
        # "writing" counts only the time the loop waits for the writer thread (and the final attributes).
        timings = {"labels": 0.0, "sampling": 0.0, "writing": 0.0, **({"scoring": 0.0} if self.scorer is not None else {})}
        rendered, stopped = 0, False
        with _Writer() as writer:
            for idx in batches:
                if should_stop():
                    stopped = True
                    break
                t0 = time.perf_counter()
                inst_maps, type_maps, label_provs, init, cond = self._labels(idx, cache, tiles)
                seeds = [item_seed(c.seed, i) for i in idx]
                timings["labels"] += time.perf_counter() - t0
                kwargs = dict(init_image=init, strength=c.strength) if c.init == "original" else {}
                last = None
                t_step = t_batch = time.perf_counter()
                # The sampler polls should_stop between UNet stages too: a stop lands within one network
                # pass, not after the batch (a batch of 256 px patches ran for minutes after Ctrl-C).
                steps = sampler.sample(cond, sampler=c.sampler, steps=c.steps, guidance=self.guidance, seed=seeds,
                                       should_stop=should_stop, **kwargs)
                while True:
                    try:
                        last = next(steps)
                    except StopIteration:
                        break
                    except RenderError as exc:  # nothing of this batch is written
                        raise RenderError(f"items {idx[0]}..{idx[-1]}: {exc}; nothing of them was written") from None
                    except RuntimeError as exc:
                        if not out_of_memory(exc):
                            raise
                        raise RenderError(
                            f"out of memory on {self.device} rendering items {idx[0]}..{idx[-1]} ({len(idx)} x "
                            f"{self.plan.patch_size} px); nothing of them was written: lower --batch-size and run the "
                            "same command again to resume"
                        ) from None
                    timings["sampling"] += time.perf_counter() - t_step
                    yield JobEvent("preview", n_done, total, step=last.step, steps=last.total,
                                   elapsed=time.perf_counter() - t_batch, indices=tuple(idx), preview=last)
                    t_step = time.perf_counter()
                if last is None or last.step < last.total:  # stopped inside the batch: none of it is written
                    stopped = True
                    break
                images = to_uint8(last.x_t)
                timings["sampling"] += time.perf_counter() - t_step
                provs = [self._provenance(p, i, s) for p, i, s in zip(label_provs, idx, seeds)]
                t2 = time.perf_counter()
                writer.submit(write_items, group, idx[0], images, inst_maps, type_maps, provs, where=str(self.out))
                timings["writing"] += time.perf_counter() - t2
                if self.scorer is not None:  # overlaps the writer thread's write of the same batch
                    from .fidelity import write_record

                    t3 = time.perf_counter()
                    for k, i in enumerate(idx):
                        write_record(group, i, self.scorer.score(images[k], inst_maps[k], type_maps[k], provs[k]), self.out)
                    timings["scoring"] += time.perf_counter() - t3
                n_done += int((~done[idx[0] : idx[-1] + 1]).sum())
                done[idx[0] : idx[-1] + 1] = True
                rendered += len(idx)
                yield JobEvent("item", n_done, total, indices=tuple(idx), data=RenderedBatch(images, inst_maps, type_maps))
            t2 = time.perf_counter()
            writer.wait()
            timings["writing"] += time.perf_counter() - t2
        if dist is not None:
            dist.barrier()
        t_fin = time.perf_counter()
        result = self._finish(group, stopped) if info.is_main else None
        timings["writing"] += time.perf_counter() - t_fin
        timings["total"] = time.perf_counter() - t_start
        if result is None:
            done_now = read_done(group)
            result = SynthesisResult(self.out, total, int(done_now.sum()), rendered, stopped, bool(done_now.all()), {})
        result.rendered, result.stopped, result.timings = rendered, stopped, timings
        result.rank, result.world_size = info.rank, info.world_size
        self.result = result
        yield JobEvent("done", result.done, total)

    def _finish(self, group: Any, stopped: bool) -> SynthesisResult:
        """Rank 0, after every rank is done: class counts, status, training files."""
        done = read_done(group)
        c = self.scheme.num_classes
        synthetic = np.zeros(c + 1, np.int64)
        if done.any():
            texts = np.asarray(group["provenance"][:])
            for i in np.flatnonzero(done):
                nuclei = json.loads(str(texts[i]))["nuclei"]
                synthetic += [0] + [int(nuclei[name]) for name in self.scheme.names]
        before = np.asarray(self.plan.original_counts, np.int64)
        after = synthetic + (before if self.originals_mode != "none" else 0)
        counts = {
            "classes": ["background", *self.scheme.names],
            "before": before.tolist(),
            "planned": [int(v) for v in self.plan.planned_counts],
            "synthetic": synthetic.tolist(),
            "after": after.tolist(),
        }
        complete = bool(done.all())
        status = "complete" if complete else ("stopped" if stopped else "in progress")
        update_attrs(self.out, {"class_counts": counts, "status": status, "items_done": int(done.sum())})
        fidelity = None
        if self.scorer is not None:
            from .fidelity import DEFAULT_MIN_FIDELITY, score_store, training_fidelity
            from .store import open_store

            # Items finished by an earlier run without scoring are scored now (the lock is ours already).
            threshold = DEFAULT_MIN_FIDELITY if self.min_fidelity is None else self.min_fidelity
            score_store(self.out, self.scorer, min_fidelity=threshold, lock=False, training_files=False)
            fidelity = training_fidelity(open_store(self.out))
        if complete:
            ref = self.reference["path"] if self.reference and self.originals_mode == "reference" else None
            write_training_files(
                self.out, data=ref, scheme=self.scheme, patch_size=self.plan.patch_size, counts=counts, items=len(self.plan),
                originals={"include": "included", "reference": "referenced", "none": "none"}[self.originals_mode],
                fidelity=fidelity,
            )
        return SynthesisResult(self.out, len(self.plan), int(done.sum()), 0, stopped, complete, counts)

    def run(self, pbar: Any | None = None, should_stop: Callable[[], bool] | None = None) -> SynthesisResult:
        """Run to the end (or a stop request) with a progress bar; returns the result."""
        stopping = ("stopping within the current step; finished batches stay in the store, the one being rendered "
                    "is rendered again on resume (Ctrl-C again aborts)")
        with StopRequests(should_stop, stopping) as requests, contextlib.ExitStack() as stack:
            bar = None
            try:
                for event in self.events(requests.poll):
                    if bar is None and event.kind == "progress":
                        desc = "synthesize"
                        if self.dist_info.world_size > 1:
                            desc += f" (rank {self.dist_info.rank}/{self.dist_info.world_size})"
                        bar = stack.enter_context(progress_bar(pbar, self.pending, desc, unit="item"))
                    elif event.kind == "item":
                        bar.update(len(event.indices))
            except KeyboardInterrupt:  # a second Ctrl-C: the store must not keep saying "in progress"
                self._mark_stopped()
                raise
        if requests.requested in ("SIGINT", "SIGTERM"):
            self.result.signal = requests.requested
        return self.result

    def _mark_stopped(self) -> None:
        info = getattr(self, "dist_info", None)
        if (info is not None and not info.is_main) or output_kind(self.out) != "store":
            return
        import zarr

        with contextlib.suppress(Exception):  # the interrupt itself is what the user needs to see
            done = read_done(zarr.open_group(str(self.out), mode="r"))
            if not done.all():
                update_attrs(self.out, {"status": "stopped", "items_done": int(done.sum())})
