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



def test_decoding_options_round_trip_rename_and_seed_presence():
    from softprompt.prompts.options import DecodingOptions
    from softprompt.protos import softprompt_pb2 as pb
    from softprompt.protos.options import decoding_from_pb, decoding_to_pb

    # Floats a float32 field holds exactly, so the round trip compares equal.
    custom = DecodingOptions(max_new_tokens=9, temperature=0.5, top_k=4, top_p=0.25, seed=0, stop=["\n", "END"],
                             chat=True)
    message = decoding_to_pb(custom)
    assert message.apply_chat_template and list(message.stop) == ["\n", "END"]  # chat is apply_chat_template
    assert message.HasField("seed") and message.seed == 0  # a 0 seed is a seed, sent with presence
    assert decoding_from_pb(message) == custom
    assert not decoding_to_pb(DecodingOptions()).HasField("seed")  # None: not seeded, left unset
    assert decoding_to_pb(DecodingOptions()) == pb.DecodingParameters()
    assert decoding_from_pb(pb.DecodingParameters()) == DecodingOptions()  # unset fields: the defaults
    assert decoding_from_pb(pb.DecodingParameters()).seed is None
    assert decoding_from_pb(pb.DecodingParameters(top_k=3, seed=5)) == DecodingOptions(top_k=3, seed=5)


def test_decoding_options_keep_stop_sequences_as_a_tuple():
    from softprompt.prompts.options import DecodingOptions

    assert DecodingOptions(stop="\n").stop == ("\n",)  # a lone string is one stop sequence, not one per char
    assert DecodingOptions(stop=["a", "b"]) == DecodingOptions(stop=("a", "b"))
    assert hash(DecodingOptions(stop=["a"])) == hash(DecodingOptions(stop=("a",)))


def test_message_mapping_checks_fields_when_built_and_reads_unset_fields():
    import dataclasses

    import pytest

    from softprompt.protos import softprompt_pb2 as pb
    from softprompt.protos.mapping import MessageMapping

    @dataclasses.dataclass(frozen=True)
    class Usage:
        input_tokens: int
        virtual_tokens: int

    with pytest.raises(TypeError, match=r"only on the wire \['generated_tokens'\]"):
        MessageMapping(Usage, pb.Usage)
    with pytest.raises(TypeError, match="has no fields"):
        MessageMapping(Usage, pb.Usage, renames={"nope": "generated_tokens"})

    @dataclasses.dataclass(frozen=True)
    class Metrics:
        examples: int
        loss: float
        exact_match: float = 0.5
        accuracy: float | None = None

    metrics = MessageMapping(Metrics, pb.EvalMetrics)
    # Unset: the default where there is one, else the wire's zero; an absent optional reads as None.
    assert metrics.from_pb(pb.EvalMetrics()) == Metrics(examples=0, loss=0.0, exact_match=0.5, accuracy=None)
    assert metrics.from_pb(pb.EvalMetrics(examples=3, accuracy=0.0)).accuracy == 0.0  # present, though 0
    assert not metrics.to_pb(Metrics(1, 2.0)).HasField("accuracy")

    @dataclasses.dataclass(frozen=True)
    class Chunk:
        text: str
        token_ids: list[int]
        finish_reason: str
        usage: object
        prompt_version: str

    with pytest.raises(TypeError, match="finish_reason is an enum or message on the wire"):
        MessageMapping(Chunk, pb.GenerateStreamResponse, decode={"usage": str})
    chunks = MessageMapping(Chunk, pb.GenerateStreamResponse, decode={"usage": str, "finish_reason": str})
    assert chunks.from_pb(pb.GenerateStreamResponse(token_ids=[1, 2])).token_ids == [1, 2]  # typed list: a list
    with pytest.raises(TypeError, match="needs an encode converter"):
        chunks.to_pb(Chunk("", [], "eos", None, ""))
