"""One syntax for what a term reads (issue 9, item 1): module outputs, items of them, module
inputs and fields of the model's output."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from kdkit import Distiller, Term
from kdkit.capture import StepCapture, parse_address, probe_shapes
from kdkit.losses import MSEHiddenStatesLoss


class Pair(nn.Module):
    def forward(self, x):
        return x * 2, {"key": x * 3}


@dataclass
class Out:
    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.pair = Pair()
        self.head = nn.Linear(4, 3)

    def forward(self, x, output_hidden_states=False):
        h = self.inner(x)
        a, _ = self.pair(h)
        states = (x, h, a) if output_hidden_states else None
        return Out(self.head(a), states)


def test_parse_address_forms():
    assert parse_address("a.b").module == "a.b"
    a = parse_address("m.attention.self[1]")
    assert (a.module, a.items, a.input) == ("m.attention.self", (1,), False)
    assert parse_address("m['key'][0]").items == ("key", 0)
    assert parse_address('m:input["hidden_states"]').input
    o = parse_address("output.hidden_states[-1]")
    assert (o.module, o.field, o.items, o.output_flag) == (
        None,
        "hidden_states",
        (-1,),
        "output_hidden_states",
    )
    with pytest.raises(ValueError, match="cannot parse address 'm\\[x\\]'"):
        parse_address("m[x]")


def test_step_capture_reads_items_inputs_and_output_fields():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 4)
    addresses = ["pair[0]", 'pair[1]["key"]', "pair:input", "inner", "output.hidden_states[1]"]
    capture = StepCapture(net, addresses)
    assert capture.call_kwargs == {"output_hidden_states": True}
    out, feats = capture(net, x)
    h = net.inner(x)
    torch.testing.assert_close(feats["pair[0]"], 2 * h)
    torch.testing.assert_close(feats['pair[1]["key"]'], 3 * h)
    torch.testing.assert_close(feats["pair:input"], h)
    torch.testing.assert_close(feats["output.hidden_states[1]"], h)
    assert net.pair._forward_hooks == {} and net.pair._forward_pre_hooks == {}
    assert probe_shapes(net, ["pair[1]['key']", "output.hidden_states[0]"], x) == {
        "pair[1]['key']": torch.Size([2, 4]),
        "output.hidden_states[0]": torch.Size([2, 4]),
    }


def test_a_term_reads_output_fields_and_items():
    torch.manual_seed(0)
    student, teacher, x = Net(), Net(), torch.randn(3, 4)
    term = Term(MSEHiddenStatesLoss(), student="output.hidden_states[2]", teacher="pair[0]")
    value = Distiller(student, teacher, [term])(x).loss
    expected = ((2 * student.inner(x) - 2 * teacher.inner(x)) ** 2).mean()
    torch.testing.assert_close(value, expected)


def test_unknown_names_list_close_modules_and_output_fields():
    with pytest.raises(ValueError, match=r"closest: \['inner'.*output\.hidden_states\[i\]"):
        Distiller(Net(), Net(), [Term(MSEHiddenStatesLoss(), student="innr", teacher="inner")])


def test_missing_output_field_says_what_to_pass():
    class NoStates(Net):
        def forward(self, x):
            return Out(self.head(self.inner(x)))

    term = Term(MSEHiddenStatesLoss(), student="output.hidden_states[1]", teacher="inner")
    distiller = Distiller(NoStates(), Net(), [term])
    with pytest.raises(ValueError, match=r"has no 'hidden_states'.*output_hidden_states=True"):
        distiller(torch.randn(2, 4))
    attention = Term(MSEHiddenStatesLoss(), student="output.attentions[0]", teacher="inner")
    with pytest.raises(ValueError, match=r"sdpa.*attn_implementation='eager'"):
        Distiller(NoStates(), Net(), [attention])(torch.randn(2, 4))
