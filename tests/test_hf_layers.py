"""Students from teacher layers: exact copies, shape checks, clear errors, export."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from darkknowledge.errors import DKError  # noqa: E402
from darkknowledge.hf.io import build_tiny, load_model, save_pretrained  # noqa: E402
from darkknowledge.hf.layers import (  # noqa: E402
    copy_layers,
    layer_stack,
    num_layers,
    student_from_teacher,
)

ARCHS = [
    ("tiny-bert", "AutoModelForMaskedLM", "encoder.layer"),
    ("tiny-roberta", "AutoModelForMaskedLM", "encoder.layer"),
    ("tiny-gpt2", "AutoModelForCausalLM", "h"),
    ("tiny-llama", "AutoModelForCausalLM", "layers"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _base(m):
    return getattr(m, m.base_model_prefix)


@pytest.mark.parametrize(("name", "auto", "stack"), ARCHS)
@pytest.mark.parametrize("layers", [None, [0, 1, 3]])
def test_layer_copy_reproduces_teacher_tensors(name, auto, stack, layers):
    teacher = build_tiny(name, auto, seed=1)
    student = student_from_teacher(teacher, layers)
    chosen = layers or [0, 2]  # default: every other layer of 4
    assert num_layers(student) == len(chosen)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    prefix = f"{teacher.base_model_prefix}.{stack}."
    copied = 0
    for key, s in s_sd.items():
        if key.startswith(prefix):
            i, rest = key[len(prefix) :].split(".", 1)
            t = t_sd[f"{prefix}{chosen[int(i)]}.{rest}"]
        else:  # embeddings, final norm, heads: the same name in both
            t = t_sd[key]
        assert torch.equal(s, t), key
        copied += 1
    assert copied == len(s_sd)
    # and the student's layers really are distinct copies of different teacher layers
    _, s_layers = layer_stack(student)
    _, t_layers = layer_stack(teacher)

    def matrix(layer):  # a weight matrix (the first parameters may be LayerNorm ones)
        return next(p for p in layer.parameters() if p.ndim == 2)

    w = matrix(s_layers[1])
    assert torch.equal(w, matrix(t_layers[chosen[1]]))
    assert not torch.equal(w, matrix(t_layers[chosen[1] - 1]))


def test_all_layers_copied_gives_the_teachers_outputs():
    teacher = build_tiny("tiny-bert", "AutoModelForMaskedLM", seed=2).eval()
    student = student_from_teacher(teacher, [0, 1, 2, 3]).eval()
    x = torch.randint(5, 1000, (2, 9))
    with torch.no_grad():
        assert torch.equal(teacher(input_ids=x).logits, student(input_ids=x).logits)


def test_bare_encoder_teacher_gives_a_classifier_student():
    teacher = build_tiny("tiny-bert", "AutoModel", seed=0)  # like MiniLM: no head
    student = student_from_teacher(teacher, [1, 3], "AutoModelForSequenceClassification")
    assert type(student).__name__ == "BertForSequenceClassification"
    assert torch.equal(
        student.bert.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight
    )
    assert torch.equal(
        student.bert.encoder.layer[1].output.dense.weight,
        teacher.encoder.layer[3].output.dense.weight,
    )


def test_random_init_has_the_same_shape_but_not_the_weights():
    teacher = build_tiny("tiny-bert", "AutoModelForMaskedLM", seed=0)
    a = student_from_teacher(teacher, [0, 2], init="random", seed=5)
    b = student_from_teacher(teacher, [0, 2], init="random", seed=5)
    w = "bert.encoder.layer.0.attention.self.query.weight"
    assert a.state_dict()[w].shape == teacher.state_dict()[w].shape
    assert not torch.equal(a.state_dict()[w], teacher.state_dict()[w])
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])  # seeded


def test_width_mismatch_is_a_clear_error():
    teacher = build_tiny("tiny-bert", "AutoModelForMaskedLM")
    with pytest.raises(DKError, match=r"shape mismatch: student .*\(1000, 32\) vs teacher") as e:
        student_from_teacher(teacher, [0, 2], hidden_size=32)
    assert "\n" not in str(e.value)


def test_an_impossible_student_config_is_one_line():
    teacher = build_tiny("tiny-bert", "AutoModel")
    with pytest.raises(DKError, match="cannot build the student") as e:
        student_from_teacher(teacher, [0, 2], hidden_size=30)  # not a multiple of 4 heads
    assert "\n" not in str(e.value)


def test_intermediate_size_mismatch_names_the_tensor():
    teacher = build_tiny("tiny-bert", "AutoModelForMaskedLM")
    other = build_tiny(
        "tiny-bert", "AutoModelForMaskedLM", num_hidden_layers=2, intermediate_size=96
    )
    with pytest.raises(DKError, match=r"intermediate\.dense\.weight"):
        copy_layers(other, teacher, [0, 2])


def test_different_architectures_are_refused():
    teacher = build_tiny("tiny-gpt2", "AutoModelForCausalLM")
    student = build_tiny("tiny-bert", "AutoModelForMaskedLM", num_hidden_layers=2)
    with pytest.raises(DKError, match="has no tensor for the student's"):
        copy_layers(student, teacher, [0, 2])


def test_unsupported_architecture_names_what_is_missing():
    cfg = transformers.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64
    )
    model = transformers.AutoModel.from_config(cfg)
    with pytest.raises(DKError, match=r"model_type 'distilbert'.*no known layer stack"):
        student_from_teacher(model)
    with pytest.raises(DKError, match="not a transformers model"):
        student_from_teacher(torch.nn.Linear(2, 2))


def test_bad_layer_lists():
    teacher = build_tiny("tiny-bert", "AutoModel")
    with pytest.raises(DKError, match=r"\[4\] out of range; the teacher has 4 layers"):
        student_from_teacher(teacher, [0, 4])
    with pytest.raises(DKError, match="increasing"):
        student_from_teacher(teacher, [2, 0])
    with pytest.raises(DKError, match="at least one layer"):
        student_from_teacher(teacher, [])


def test_exported_student_reloads_with_the_same_logits(tmp_path):
    teacher = build_tiny("tiny-bert", "AutoModelForSequenceClassification", num_labels=3)
    student = student_from_teacher(teacher).eval()
    save_pretrained(student, tmp_path / "student")
    again = load_model(tmp_path / "student", "AutoModelForSequenceClassification").eval()
    assert again.config.num_hidden_layers == 2
    x = torch.randint(5, 1000, (3, 11))
    mask = torch.ones_like(x)
    mask[0, 6:] = 0
    with torch.no_grad():
        assert torch.equal(
            student(input_ids=x, attention_mask=mask).logits,
            again(input_ids=x, attention_mask=mask).logits,
        )
