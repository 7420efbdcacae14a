"""The committed stubs are what the proto generates; the shared enum and option conversions cover the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_fresh():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_generated_stubs_support_the_oldest_grpcio():
    text = (ROOT / "protos" / "softprompt_pb2_grpc.py").read_text()
    assert "GRPC_GENERATED_VERSION = '1.84.0'" in text, "regenerate with grpcio-tools==1.84.0 (pyproject's dev extra)"


def test_enums_map_every_wire_value_both_ways():
    from softprompt.prompts.outcomes import FinishReason, TrainingState
    from softprompt.protos import enums
    from softprompt.protos import softprompt_pb2 as pb

    for wire, to_pb, from_pb, enum in ((pb.FinishReason, enums.finish_reason_to_pb, enums.finish_reason_from_pb,
                                        FinishReason),
                                       (pb.TrainingState, enums.training_state_to_pb, enums.training_state_from_pb,
                                        TrainingState)):
        named = {name: number for name, number in wire.items() if not name.endswith("_UNSPECIFIED")}
        assert {wire.Name(to_pb(member)) for member in enum} == set(named)
        for member in enum:
            assert from_pb(to_pb(member)) is member and to_pb(member.value) == to_pb(member)
        assert from_pb(0) is None  # UNSPECIFIED: the sender did not say
    assert enums.finish_reason_to_pb("eos") == pb.FINISH_REASON_EOS
    assert enums.training_state_from_pb(pb.TRAINING_STATE_CANCELLED) == "cancelled"


def test_training_options_round_trip_and_unset_fields_take_defaults():
    import pytest

    from softprompt.prompts.options import TrainingOptions
    from softprompt.protos import softprompt_pb2 as pb
    from softprompt.protos.options import options_from_pb, options_to_pb

    # Optional fields set to 0 survive: they are sent with presence, not mistaken for "unset".
    custom = TrainingOptions(num_virtual_tokens=7, init="text:be brief", learning_rate=0.5, epochs=2, max_steps=9,
                             batch_size=3, grad_accum=2, max_length=64, seed=0, eval_fraction=0.0, eval_every=4,
                             patience=0, apply_chat_template=True, warmup_steps=5)
    assert options_from_pb(options_to_pb(custom)) == custom
    assert options_from_pb(pb.TrainingOptions()) == TrainingOptions()
    assert options_from_pb(pb.TrainingOptions(seed=4, epochs=6)) == TrainingOptions(seed=4, epochs=6)
    with pytest.raises(ValueError, match="eval_fraction"):
        options_from_pb(pb.TrainingOptions(eval_fraction=1.5))

