"""The chunked loss gives the model's own loss and gradients, for every family, full and LoRA."""

import copy

import pytest
import torch

from conftest import demo_params
from ftstudy import loss, modeling
from ftstudy.config import parse_params
from ftstudy.synthetic import FAMILIES, write_tiny_model
from ftstudy.train import lora

# One pytest-xdist worker runs this file: its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("loss")


class ScaledBeforeHead(torch.nn.Module):
    """A causal LM whose forward halves the last hidden state before the head: body + head alone
    would score it wrongly, and nothing in its config says so."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config, self.base_model_prefix = model.config, model.base_model_prefix
        setattr(self, model.base_model_prefix, getattr(model, model.base_model_prefix))

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, **kwargs):
        from transformers.modeling_outputs import CausalLMOutput

        hidden = getattr(self.inner, self.base_model_prefix)(input_ids=input_ids).last_hidden_state
        return CausalLMOutput(logits=self.inner.get_output_embeddings()(hidden * 0.5))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: write_tiny_model(family, root / family) for family in FAMILIES}


def loss_and_grads(module: torch.nn.Module, batch: torch.Tensor) -> tuple[float, dict]:
    value = module(batch)
    value.backward()
    return value.item(), {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def assert_same(own, chunked):
    (own_loss, own_grads), (chunked_loss, chunked_grads) = own, chunked
    assert chunked_loss == pytest.approx(own_loss, rel=1e-5)
    assert own_grads.keys() == chunked_grads.keys() and own_grads
    for name, g in own_grads.items():  # each tensor's largest difference, relative to its largest entry
        assert (chunked_grads[name] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-12, name


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["full", "lora"])
def test_chunked_loss_matches_the_models_own(models, family, method, monkeypatch):
    model = modeling.load_causal_lm(models[family])
    if method == "lora":
        model = lora.wrap(model, parse_params(demo_params()).lora, "x")
    model.eval()  # no dropout (LoRA's included), so both losses see the same network
    torch.manual_seed(0)
    batch = torch.randint(0, 1000, (3, 40))
    own = loss_and_grads(loss.ModelOwnLoss(copy.deepcopy(model)), batch)
    monkeypatch.setattr(loss, "CHUNK_LOGITS", 1025 * 17)  # 17 positions a chunk: several chunks, a ragged last
    assert_same(own, loss_and_grads(loss.CausalLMLoss(model), batch))


def test_a_model_with_logit_scaling_is_refused_naming_the_key(models):
    model = modeling.load_causal_lm(models["llama"])
    model.config.final_logit_softcapping = 30.0
    why, diff = loss.check_fast_path(model, torch.randint(0, 1000, (1, 16)))
    assert why == "its config sets final_logit_softcapping, which the chunked loss does not apply" and diff is None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_fast_path_check_passes_every_family_and_catches_a_forward_that_differs(models, family):
    model = modeling.load_causal_lm(models[family])
    batch = torch.randint(0, 1000, (2, 24))
    why, diff = loss.check_fast_path(model, batch)
    assert why is None and diff < 1e-5, (why, diff)
    why, diff = loss.check_fast_path(ScaledBeforeHead(model), batch)
    assert why.startswith("on one batch its per-token NLL through body + head differs from its own forward by up to")
    assert why.endswith("the forward does more than body + head") and diff > 1e-2
