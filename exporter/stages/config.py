"""What one run depends on: the settings, and the defaults that follow from the weights."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from exporter.options import PRECISIONS, QUANTIZE, TARGETS  # noqa: F401  (imported from here by the pipeline)
from exporter.runtimes import DEFAULT_RUNTIMES
from exporter.stages.effort import Effort, resolve_effort
from search.methods.acp import AcpConfig
from search.methods.dsp import DspConfig
from search.methods.registry import HEAD_SHARE


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``prune-export`` run depends on.

    Attributes:
        model: bundled name, alias or timm ViT name.
        budget: fraction of dense MACs to keep, in (0, 1].
        output: the ONNX file to write.
        method: selection method (see ``search.methods.registry``); None means acp for real weights (on --data,
            or on the built-in photographs without it) and magnitude for random weights, which hold
            nothing a search or a recovery could keep.
        align: kept widths are multiples of this; None (``--align auto``) takes the latency table's
            alignment when there is a table (``--latency-budget`` or ``--target-runtime``), else 8.
        checkpoint: state dict to load instead of pretrained weights.
        num_classes: the classifier head's size (0: a backbone); None reads it from the checkpoint.
        model_args: further ``timm.create_model`` keyword arguments, as (name, value) pairs.
        pruned_weights: a pruned-model file (``OUT.pt``, perhaps fine-tuned since) to export instead of
            cutting and repairing: its plan is replayed, and no compensation or recovery runs.
        random_init: allow random weights when no others are available.
        img_size: input resolution; None for the model's default.
        data: ImageFolder for search, recovery, calibration and parity; None for the built-in
            photographs (real weights) or random inputs (random weights).
        plan: replay this plan instead of searching.
        per_head_indices: choose indices per head (same count) instead of shared indices.
        similarity: acp: similarity-based weights in the ranking.
        attn_init: acp: attention-difference initialisation of the indicators.
        indicator: acp: ``shared`` or ``free`` attention indicators; None for AcpConfig's default.
        widths: acp: ``search`` or ``greedy`` plan widths; None for AcpConfig's default.
        gate_optimiser: acp: ``shared-scale`` or ``adam`` for the indicators; None for AcpConfig's default.
        reweight: train reweight modules during recovery (folded before export).
        compensate: refit the layers that read a cut dimension in closed form right after the cut
            (``exporter.compensation``); real weights only.
        effort: ``fast``, ``default`` or ``best`` (``exporter.stages.effort``): sets the four numbers
            below that are None, sized for the device the run trains on.
        search_steps: search steps (acp, DSP); None for the effort's.
        finetune_steps: recovery steps; None for the effort's with real weights, 0 with random ones.
        search_images: images drawn for search and recovery; None for the effort's.
        heldout_images: further images, held out, to pick the best recovery state and to check parity
            and fidelity; None for the effort's.
        batch_size: global batch of every search and recovery step; None for the effort's.
        device: auto, cpu or cuda for search and recovery.
        seed: seeds random weights, sampling and the search.
        calib_images: images used for parity.
        target: ``portable`` (standard ONNX ops, runs anywhere) or ``ort`` (ONNX Runtime's offline-optimised graph).
        precision: ``fp32``, or ``fp16`` for GPU artifacts (inputs and outputs stay fp32).
        quantize: ``none``, or ``int8`` (ONNX Runtime quantization of the weight MatMuls).
        quantize_mode: ``dynamic``, or ``static`` calibrated on the search images.
        latency_runs: interleaved runs per model for the latency medians (0 skips latency).
        pattern: FLatten models only: "L" (focused linear) or "S" (softmax) attention per block.
        latency_batches: batch sizes to time.
        threads: inference threads (ONNX Runtime intra-op, OpenVINO INFERENCE_NUM_THREADS); None for every
            core this process may use.
        runtimes: runtimes (``exporter.runtimes``) for parity and latency; the first one's figures
            are also the report's top-level "parity" and "latency".
        opset: ONNX opset.
        heads: head-pruning methods: K, the heads kept in the whole model; None derives K from the
            budget (``search.methods.heads.heads_for_budget``). With a heads-only method (dsp,
            head-magnitude) the budget is then no constraint and must be 1.0.
        heads_scope: ``layer`` (each block keeps its share of K) or ``global`` (the best K anywhere).
        head_share: dsp+acp without ``heads``: the fraction of the MAC cut taken by removing heads.
        dsp_t0, dsp_tf, dsp_cooldown, dsp_lr, dsp_straight_through: DSP search settings; None
            (False) for :class:`search.methods.dsp.DspConfig`'s defaults.
        keep_work: keep the work directory after a successful run. The command line removes it
            unless --keep-work; callers of ``exporter.pipeline.run`` (the benches) keep it by default.
        latency_budget: set when the budget is a share of the dense latency on the target (then
            ``budget`` holds the same value); None for a MAC budget.
        target_runtime: ``--target-runtime`` (``exporter.latency_targets.TARGETS``); None: the first of
            ``runtimes`` on the CPU. Naming it with a MAC budget times a table too, for ``--align auto``
            and the predicted latency.
        latency_batch: the target's batch size.
        solver_budget: the correction round's budget for the width solver (the search keeps ``budget``).
        latency_correction: the first round's figures, carried into the correction round's report.
    """

    model: str
    budget: float
    output: Path
    method: str | None = None
    align: int | None = None
    checkpoint: Path | None = None
    num_classes: int | None = None
    model_args: tuple[tuple[str, Any], ...] = ()
    pruned_weights: Path | None = None
    random_init: bool = False
    img_size: int | None = None
    data: Path | None = None
    plan: Path | None = None
    per_head_indices: bool = False
    similarity: bool = True
    attn_init: bool = True
    indicator: str | None = None
    widths: str | None = None
    gate_optimiser: str | None = None
    reweight: bool = True
    compensate: bool = True
    effort: str = "default"
    search_steps: int | None = None
    finetune_steps: int | None = None
    search_images: int | None = None
    heldout_images: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    seed: int = 0
    calib_images: int = 16
    target: str = "portable"
    precision: str = "fp32"
    quantize: str = "none"
    quantize_mode: str = "dynamic"
    latency_runs: int = 20
    pattern: str | None = None
    latency_batches: tuple[int, ...] = (1,)
    threads: int | None = None
    opset: int = 17
    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES
    heads: int | None = None
    heads_scope: str | None = None
    head_share: float | None = None
    dsp_t0: float | None = None
    dsp_tf: float | None = None
    dsp_cooldown: int | None = None
    dsp_lr: float | None = None
    dsp_straight_through: bool = False
    keep_work: bool = True
    latency_budget: float | None = None
    target_runtime: str | None = None
    latency_batch: int = 1
    solver_budget: float | None = None
    latency_correction: dict[str, Any] | None = None

    @property
    def work_dir(self) -> Path:
        return self.output.with_suffix(".work")

    def selection_method(self, random_weights: bool) -> str:
        """The method this run uses: the one asked for, else acp for real weights and magnitude for random ones."""
        if self.method is not None:
            return self.method
        return "magnitude" if random_weights else "acp"

    @property
    def times_target(self) -> bool:
        """Whether the run builds a latency table (a latency budget, or a target named)."""
        return self.latency_budget is not None or self.target_runtime is not None

    def head_options(self) -> dict[str, object]:
        """The head-pruning options given (not left at their defaults), by their command-line names."""
        given = {"--heads": self.heads, "--heads-scope": self.heads_scope, "--head-share": self.head_share,
                 "--dsp-t0": self.dsp_t0, "--dsp-tf": self.dsp_tf, "--dsp-cooldown": self.dsp_cooldown,
                 "--dsp-lr": self.dsp_lr, "--dsp-straight-through": self.dsp_straight_through or None}
        return {name: value for name, value in given.items() if value is not None}

    @property
    def scope(self) -> str:
        """The head scope: the one given, else ``layer``."""
        return self.heads_scope or "layer"

    @property
    def share(self) -> float:
        """dsp+acp's head share: the one given, else the default."""
        return HEAD_SHARE if self.head_share is None else self.head_share

    def acp_config(self) -> AcpConfig:
        """The acp search settings of this run (OptionError for an unknown --indicator or --widths)."""
        d = AcpConfig(budget=self.budget)
        return AcpConfig(budget=self.budget, steps=self.search_steps or d.steps, batch_size=self.batch_size or d.batch_size,
                         similarity=self.similarity, attn_init=self.attn_init,
                         indicator=self.indicator or d.indicator, widths=self.widths or d.widths,
                         optimiser=self.gate_optimiser or d.optimiser, seed=self.seed)

    def dsp_config(self) -> DspConfig:
        """The DSP search settings of this run (its length is --search-steps, like acp's)."""
        d = DspConfig()
        return DspConfig(
            steps=self.search_steps or d.steps, batch_size=self.batch_size or d.batch_size,
            lr=d.lr if self.dsp_lr is None else self.dsp_lr,
            t0=d.t0 if self.dsp_t0 is None else self.dsp_t0, tf=d.tf if self.dsp_tf is None else self.dsp_tf,
            cooldown=self.dsp_cooldown, straight_through=self.dsp_straight_through, seed=self.seed,
        )

    def effort_for(self, device_type: str) -> Effort:
        """The effort of this run on ``device_type``, with the numbers given explicitly in place of the level's."""
        return resolve_effort(self.effort, device_type, search_steps=self.search_steps, finetune_steps=self.finetune_steps,
                              search_images=self.search_images, heldout_images=self.heldout_images,
                              batch_size=self.batch_size)

    def recovery_steps(self, random_weights: bool, device_type: str = "cpu") -> int:
        """Recovery steps: the ones asked for, else the effort's for real weights and none for random ones."""
        if self.finetune_steps is not None:
            return self.finetune_steps
        return 0 if random_weights else self.effort_for(device_type).finetune_steps


def resolve_defaults(cfg: RunConfig, random_weights: bool, device_type: str = "cpu") -> RunConfig:
    """``cfg`` with the method, the effort's numbers and the recovery steps the weights call for filled in."""
    effort = cfg.effort_for(device_type)
    return replace(cfg, method=cfg.selection_method(random_weights), search_steps=effort.search_steps,
                   finetune_steps=cfg.recovery_steps(random_weights, device_type), search_images=effort.search_images,
                   heldout_images=effort.heldout_images, batch_size=effort.batch_size)
