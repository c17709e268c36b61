"""A model family defined and registered in this file only, through the whole pipeline.

The point of the family seam (``search.families.base``) is that a new kind of model needs its own
``ModelFamily`` and no change to generic code. This file holds a toy network that is not a timm
ViT (its own class names, block structure and attribute names: no ``blocks``, ``patch_embed``,
``embed_dim``, ``forward_features`` or ``num_classes`` for generic code to reach for) and its
family, and runs describe, the planner, surgery (channels and whole heads, a block's attention
dropped), ONNX export, parity in ONNX Runtime, the analytic-against-graph MAC count, the ORT target,
an acp search distilled on the backbone's features, and reweights through it. Its attention is
timm's softmax ``Attention``: kinds and families are independent seams.

Registration happens once per process (``_register`` is idempotent) and the family claims only
the toy class, so every other test's models keep the families they had.
"""
from __future__ import annotations

import pytest
import torch
from timm.layers import Attention
from torch import nn

from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs
from exporter.ort_target import optimize_for_ort
from exporter.reweight import HeadReweight, UnitScale, add_reweights, fold_reweights
from exporter.surgery import apply_plan
from exporter.parity import check_parity
from search.methods.acp import AcpConfig, acp_search
from search.budget.allocate import SolverConfig, head_plan, make_plan
from search.attention import TokenLayout, kind_of
from search.attention.removed import RemovedAttention
from search.core.runtime import Runtime
from search.methods.distill import block_outputs
from search.families import ModelFamily, family_of, get_family, register_family
from search.methods.importance import magnitude_scores
from search.budget.macs import describe, model_macs
from search.cut.slicing import slice_linear

NAME = "toy-net"
SIZE, PATCH, WIDTH, HEADS = 32, 8, 48, 4


class ToyLayer(nn.Module):
    """Pre-norm layer: x + mixer(pre(x)), then x + ff_out(ff_scale(ff_act(ff_in(post(x)))))."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.pre, self.post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mixer: nn.Module = Attention(width, num_heads=heads, qkv_bias=True)
        self.ff_in, self.ff_act, self.ff_out = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        self.ff_scale: nn.Module = nn.Identity()  # where the MLP reweight goes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.pre(x))
        return x + self.ff_out(self.ff_scale(self.ff_act(self.ff_in(self.post(x)))))


class ToyMlpLayer(nn.Module):
    """A :class:`ToyLayer` that kept no head: its mixer adds proj's bias (the output of all heads masked), then the MLP."""

    def __init__(self, layer: ToyLayer, width: int) -> None:
        super().__init__()
        out = kind_of(layer.mixer).reweight_target(layer.mixer)
        self.mixer_bias = nn.Parameter(out.bias.detach().clone())
        self.mixer = RemovedAttention(width)
        self.post, self.ff_in, self.ff_act, self.ff_scale, self.ff_out = layer.post, layer.ff_in, layer.ff_act, layer.ff_scale, layer.ff_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer_bias
        return x + self.ff_out(self.ff_scale(self.ff_act(self.ff_in(self.post(x)))))


class ToyNet(nn.Module):
    """Conv stem to a patch grid, one summary token in front, layers, a final norm, mean pooling and an optional classifier."""

    def __init__(self, n_classes: int = 10, depth: int = 2) -> None:
        super().__init__()
        self.image_size, self.width, self.n_classes = SIZE, WIDTH, n_classes
        self.stem = nn.Conv2d(3, WIDTH, PATCH, stride=PATCH)
        self.summary = nn.Parameter(0.1 * torch.randn(1, 1, WIDTH))
        self.position = nn.Parameter(0.1 * torch.randn(1, 1 + (SIZE // PATCH) ** 2, WIDTH))
        self.layers = nn.ModuleList(ToyLayer(WIDTH, HEADS, 2 * WIDTH) for _ in range(depth))
        self.out_norm = nn.LayerNorm(WIDTH)
        self.classifier: nn.Module = nn.Linear(WIDTH, n_classes) if n_classes else nn.Identity()

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The final tokens after the last norm: (batch, 1 + patches, width)."""
        x = self.stem(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.summary.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        for layer in self.layers:
            x = layer(x)
        return self.out_norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.tokens(images).mean(dim=1))


class ToyFamily(ModelFamily):
    """The family of :class:`ToyNet`, by class name (a second import of this file makes a second class)."""

    name = NAME
    supports = "the toy network of tests/test_toy_family.py"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == ToyNet.__name__ and hasattr(model, "layers")

    def check(self, model: nn.Module) -> None:
        pass

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.layers)

    def attention(self, block: nn.Module) -> nn.Module:
        return block.mixer

    def set_attention(self, block: nn.Module, module: nn.Module) -> None:
        block.mixer = module

    def drop_attention(self, model: nn.Module, index: int) -> nn.Module:
        layer = model.layers[index]
        if not isinstance(layer, ToyMlpLayer):
            layer = model.layers[index] = ToyMlpLayer(layer, model.width).train(layer.training)
        return layer

    def mlp_linears(self, block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        return block.ff_in, block.ff_out

    def mlp_activation(self, block: nn.Module) -> nn.Module:
        return block.ff_act

    def slice_mlp(self, block: nn.Module, units) -> None:
        block.ff_in, block.ff_out = slice_linear(block.ff_in, out_idx=units), slice_linear(block.ff_out, in_idx=units)

    def set_mlp_reweight(self, block: nn.Module, module: nn.Module) -> None:
        block.ff_scale = module

    def mlp_reweight(self, block: nn.Module) -> nn.Module:
        return block.ff_scale

    def layout(self, model: nn.Module) -> TokenLayout:
        side = model.image_size // model.stem.stride[0]
        return TokenLayout(prefix=1, grid=(side, side))

    def embed_dim(self, model: nn.Module) -> int:
        return model.width

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return model.stem.in_channels, model.image_size, model.image_size

    def features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.tokens(images)

    def classes(self, model: nn.Module) -> int:
        return model.n_classes

    def fixed_macs(self, model: nn.Module) -> int:
        stem, layout = model.stem, self.layout(model)
        macs = layout.patches * stem.out_channels * stem.in_channels * stem.kernel_size[0] * stem.kernel_size[1]
        return macs + (model.classifier.in_features * model.classifier.out_features if model.n_classes else 0)


def _register() -> ModelFamily:
    """The toy family, registered on first call only (the registry refuses a name twice)."""
    try:
        return get_family(NAME)
    except KeyError:
        return register_family(ToyFamily())


FAMILY = _register()
CPU = Runtime(torch.device("cpu"))


def toy_net(n_classes: int = 10, seed: int = 0) -> ToyNet:
    """A toy network with non-zero biases everywhere, so slicing them matters."""
    torch.manual_seed(seed)
    model = ToyNet(n_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _export_and_check(model: nn.Module, path, classifier: bool) -> None:
    export_onnx(model, path, FAMILY.input_size(model))
    assert check_parity(path, model, _images(4), classifier=classifier).passed, path.name
    assert count_onnx_macs(path) == model_macs(describe(model)), path.name


def test_the_toy_is_no_timm_model_and_only_its_family_claims_it() -> None:
    model = toy_net()
    assert family_of(model) is FAMILY and _register() is FAMILY
    for timm_attribute in ("blocks", "patch_embed", "embed_dim", "forward_features", "num_classes", "head"):
        assert not hasattr(model, timm_attribute), timm_attribute
    geometry = describe(model)
    assert geometry.family == NAME and geometry.embed_dim == WIDTH and geometry.tokens == 17
    assert FAMILY.head_counts(model) == (HEADS, HEADS) and FAMILY.input_size(model) == (3, SIZE, SIZE)


@pytest.mark.parametrize("n_classes", [10, 0], ids=["classifier", "backbone"])
def test_plan_surgery_export_parity_and_macs(tmp_path, n_classes: int) -> None:
    model = toy_net(n_classes)
    geometry = describe(model)
    plan = make_plan(geometry, magnitude_scores(model), SolverConfig(0.6, align=4), model="toy", img_size=SIZE, method="magnitude")
    assert plan.pruned_macs <= 0.6 * plan.dense_macs
    pruned = apply_plan(model, plan, geometry)
    assert isinstance(pruned, ToyNet) and model_macs(describe(pruned)) == plan.pruned_macs
    for name, m in (("dense", model), ("pruned", pruned)):
        _export_and_check(m, tmp_path / f"{name}.onnx", classifier=n_classes > 0)


def test_a_layer_that_keeps_no_head_loses_its_mixer_and_the_ort_target_keeps_parity(tmp_path) -> None:
    model = toy_net()
    plan = head_plan(describe(model), ((), (0, 2, 3)), 1.0, model="toy", img_size=SIZE, method="dsp")
    pruned = apply_plan(model, plan)
    assert isinstance(pruned.layers[0], ToyMlpLayer) and isinstance(pruned.layers[0].mixer, RemovedAttention)
    assert FAMILY.head_counts(pruned) == (0, 3)  # no one count fits: the ORT target must not take layer 0's
    _export_and_check(pruned, tmp_path / "pruned.onnx", classifier=True)
    ort = optimize_for_ort(tmp_path / "pruned.onnx", tmp_path / "ort.onnx", FAMILY.head_counts(pruned), WIDTH)
    assert check_parity(ort, pruned, _images(4), classifier=True).passed


def test_acp_distils_the_backbone_through_the_family_features_and_reweights_fold() -> None:
    model = toy_net(n_classes=0)
    images = _images(16, seed=2)
    with torch.no_grad():
        outputs = block_outputs(model, images[:2])
        assert outputs.shape == (2, 3, 17, WIDTH)  # two layers, then the family's final tokens
        torch.testing.assert_close(outputs[:, -1], model.tokens(images[:2]))
    geometry = describe(model)
    scores = acp_search(model, geometry, images, AcpConfig(budget=0.6, steps=3, batch_size=8, calib_images=4), False, CPU).scores
    plan = make_plan(geometry, scores, SolverConfig(0.6, align=4, normalise=False), model="toy", img_size=SIZE, method="acp")
    pruned = add_reweights(apply_plan(model, plan))
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, (HeadReweight, UnitScale)):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
        before = pruned(images[:2])
        fold_reweights(pruned)
        after = pruned(images[:2])
    assert all(isinstance(layer.ff_scale, nn.Identity) for layer in pruned.layers)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
