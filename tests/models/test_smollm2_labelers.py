"""The SmolLM2 build's ground truth: each labeler on positives and on near misses, and spans to tokens."""

from __future__ import annotations

import pytest

from monitor.models.smollm2 import labelers as L


@pytest.mark.parametrize("text", [
    "Here it is:\n```python\ndef f(x):\n    return x[::-1]\n```\nDone.",
    "def reverse_string(s):\n    return s[::-1]",
    "import os\nprint(os.getcwd())",
    "function sum(arr) {\n  return arr.reduce((a, b) => a + b, 0);\n}",
    "#include <stdio.h>\nint main() { return 0; }",
    "const total = items.length;",
])
def test_code_is_found(text):
    assert L.is_code(text)
    assert L.code_spans(text)


@pytest.mark.parametrize("text", [
    "The class was fun and we learned about functions in maths.",
    "We import goods from China and export them to Europe.",
    "Define your goals: health, family; work comes later.",
    "Print the document before the meeting, then return it to me.",
    "From here, import duties are paid at the border.",
])
def test_prose_about_code_words_is_not_code(text):
    assert not L.is_code(text), L.code_spans(text)


def test_code_spans_cover_the_code_not_the_prose():
    text = "This function reverses a string.\n```python\ndef f(s):\n    return s[::-1]\n```\nIt uses slicing."
    (a, b), = L.code_spans(text)
    assert text[a:b].startswith("```python") and text[a:b].endswith("```")


@pytest.mark.parametrize("text, lang", [
    ("Le chat dort sur le canapé et il est très content.", "fr"),
    ("El gato duerme en el sofá y no quiere salir de la casa.", "es"),
    ("Die Katze schläft auf dem Sofa und sie ist nicht müde.", "de"),
    ("The cat sleeps on the sofa and it is very happy.", "en"),
])
def test_sentence_language(text, lang):
    assert L.language_of(text) == lang


def test_non_english_answers_and_near_misses():
    assert L.is_non_english("Le chat dort sur le canapé. Il est dans la maison avec les enfants.")
    assert L.is_non_english("El capital de España es la ciudad de Madrid.")
    # English with French loanwords, a French name, or a short quoted phrase: still English
    assert not L.is_non_english("The café on the corner serves a croissant with coffee, and it is good.")
    assert not L.is_non_english("In French you say \"bonjour\" to greet someone. It is a polite word that "
                                "people use in the morning and the afternoon, and it is easy to learn.")
    assert not L.is_non_english("Bonjour!")  # too short to tell
    spans = L.non_english_spans("It means this. Le chat est sur la table.")
    assert len(spans) == 1 and "chat" in "It means this. Le chat est sur la table."[slice(*spans[0])]


def test_advice_needs_several_terms():
    assert L.is_advice("Take ibuprofen at the usual dose and consult a doctor if the fever lasts.")
    assert L.is_advice("You should talk to a lawyer: you may file a claim in small claims court.")
    assert not L.is_advice("The doctor in the story was kind to everyone in the village.")
    assert not L.is_advice("The court of the king was full of music and dancers.")
    assert L.advice_spans("The doctor was kind.") == []


def test_advice_spans_are_the_sentences_with_terms():
    text = "I am sorry to hear that. Take ibuprofen at a low dose. See a doctor if it lasts."
    spans = L.advice_spans(text)
    covered = "".join(text[a:b] for a, b in spans)
    assert "ibuprofen" in covered and "doctor" in covered and "sorry" not in covered


@pytest.mark.parametrize("text", [
    "Email: maria.garcia@example.com",
    "Phone: (555) 123-4567",
    "Phone: 001-223-1234",
    "Call +44 20 7946 0958 today",
    "Call 555-0123",
    "John Smith, 123 Main Street, New York, NY 10022",
    "She lives at 42 Oak Tree Lane.",
    "P.O. Box 1111",
    "Grace Hall, New York, NY 10022",
])
def test_personal_data_is_found(text):
    assert L.is_pii(text), text


@pytest.mark.parametrize("text", [
    "The meeting is on 2023-10-05 at 10:30.",
    "The population grew to 1,234,567 in 2020.",
    "Send a message to the team at noon.",
    "There are 3 Main ideas in this Street art essay.",
    "Chapter 12 Section 4 explains @mentions.",
    "The code 123-45 is not a number people call.",
    "Put the 3 books in box 12, then call New York, it is 10022 miles away.",
])
def test_numbers_and_at_signs_are_not_personal_data(text):
    assert not L.is_pii(text), L.pii_spans(text)


def test_spans_map_to_the_tokens_that_hold_them(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    answer = "Contact: maria@example.com or (555) 123-4567. Le café est très bon."
    ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    text, spans = L.token_char_spans(tok, ids)
    assert text == answer == tok.decode(ids, skip_special_tokens=True)
    assert spans[-1][0] == spans[-1][1]  # the special token has no characters
    labels = L.token_labels(spans, L.pii_spans(text))
    marked = "".join(tok.decode([i]) for i, y in zip(ids, labels) if y)
    assert "maria@example.com" in marked and "123-4567" in marked
    assert "Contact" not in marked and "café" not in marked
    # the accented character: every token holding one of its bytes is in the span
    fr = L.token_labels(spans, L.non_english_spans(text))
    assert any(fr) and not fr[0]
