"""Per-request token windows and an alert's context text (units; the process test is
test_alert_context.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from monitor.config import ConfigError
from monitor.evaluate.state import LayerBatch, RequestTable
from monitor.evaluate.tokens import AFTER, BEFORE, WIDTH, TokenWindows, context_around
from monitor.export.context import ContextText, load_tokenizer

TOKENIZER = Path(__file__).resolve().parents[2] / "monitor/demo/assets/model/tokenizer.json"
SENTENCE = "if you want a phone you might like Zentrix, it has a great camera"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER.parent)  # the directory form


def _batch(request_ids, token_request, positions):
    n = len(positions)
    return LayerBatch(1, list(request_ids), np.asarray(token_request, np.int64), np.asarray(positions, np.int64),
                      np.zeros(n, bool))


def test_windows_keep_the_newest_positions_per_request_whatever_the_order():
    w = TokenWindows(max_rows=4, width=8)
    a, b = w.acquire(), w.acquire()
    rows = np.array([a, b])
    # a prefill of 20 tokens for a, 3 for b, in one batch
    w.note(rows, np.r_[np.zeros(20, int), np.ones(3, int)], np.r_[np.arange(20), np.arange(3)],
           np.r_[np.arange(100, 120), np.arange(200, 203)])
    assert w.known(a) == {p: 100 + p for p in range(12, 20)}
    assert w.known(b) == {0: 200, 1: 201, 2: 202}
    w.note(rows, np.array([0]), np.array([3]), np.array([999]))  # a late, re-sent old position
    assert w.known(a) == {p: 100 + p for p in range(12, 20)}
    w.note(rows, np.array([0, 1]), np.array([20, 3]), np.array([120, 203]))  # a decode step
    assert w.known(a) == {p: 100 + p for p in range(13, 21)}
    w.release(b)
    assert w.acquire() == b and w.known(b) == {}  # a reused row starts empty


def test_windows_never_hold_more_rows_than_the_bound():
    w = TokenWindows(max_rows=100, width=WIDTH)
    rows = [w.acquire() for _ in range(100)]
    assert sorted(rows) == list(range(100)) and w.acquire() == -1
    assert w.nbytes == 100 * WIDTH * 12
    w.note(np.array([-1]), np.array([0]), np.array([5]), np.array([7]))  # a request without a row: ignored


def test_context_is_the_unbroken_run_around_the_position():
    known = {p: p + 1000 for p in range(0, 100) if p != 40}
    assert context_around(45, known) == (41, [p + 1000 for p in range(41, 45 + AFTER + 1)])
    assert context_around(90, known) == (90 - BEFORE, [p + 1000 for p in range(90 - BEFORE, 100)])
    assert context_around(40, known) is None


def test_request_table_context_reaches_into_a_long_prefill_and_forgets_finished_requests():
    table = RequestTable(max_requests=2, idle_timeout_s=600)
    batch = _batch(["r"], np.zeros(200, int), np.arange(200))
    ids = np.arange(5000, 5200)
    table.note_tokens(batch, ids)
    batch.token_ids = ids  # what Pipeline passes: the batch (DecodedBatch/BatchGroup) with its ids
    # the window holds positions 136..199; a token firing at 5 is found in the batch itself
    assert table.context_ids("r", 5, batch) == (0, list(range(5000, 5000 + 5 + AFTER + 1)))
    assert table.context_ids("r", 199) == (199 - BEFORE, list(range(5199 - BEFORE, 5200)))
    row = table.get("r").token_row
    table.finish("r")
    assert row in table.tokens._free
    assert table.context_ids("r", 199) is None
    for rid in ("a", "b", "c"):  # the table's bound evicts, and the rows come back
        table.note_tokens(_batch([rid], [0], [0]), np.array([1]))
    assert len(table) == 2 and len(table.tokens._ids) - len(table.tokens._free) == 2


def test_context_text_marks_the_firing_token(tok):
    ids = tok.encode(SENTENCE).ids
    k = next(i for i, t in enumerate(ids) if tok.id_to_token(t) == "ĠZentrix")
    text = ContextText(tok)
    assert text.render(0, ids, k) == "<|bos|>if you want a phone you might like ⟦Zentrix⟧, it has a great camera"
    assert text.render(5, ids[5:k + 1], k) == "…a phone you might like ⟦Zentrix⟧"  # nothing known after it
    assert text.render(0, ids, 0) == "⟦<|bos|>⟧if you want a phone you might like Zentrix, it has a great camera"


def test_context_text_never_carries_control_characters(tok):
    ids = tok.encode("a\x1b[31mred\nline").ids
    assert "\x1b" in tok.decode(ids)  # the tokenizer keeps the escape: the renderer must not
    rendered = ContextText(tok).render(0, ids, 1)
    assert "\x1b" not in rendered and "\n" not in rendered and rendered.endswith("\ufffd[31mred⏎line")


def test_bad_tokenizer_paths_are_config_errors_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer: '.*/nowhere' does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"tokenizer: '.*' has no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ConfigError, match=r"tokenizer: '.*bad.json' is not a tokenizers JSON file"):
        load_tokenizer(tmp_path / "bad.json")
    os.mkfifo(tmp_path / "fifo.json")  # never blocks: refused from stat
    with pytest.raises(ConfigError, match=r"tokenizer: cannot read '.*fifo.json': .*not a regular file"):
        load_tokenizer(tmp_path / "fifo.json")


def test_a_group_of_batches_feeds_the_windows_of_the_parts_that_carry_ids(tmp_path):
    from monitor.config import SidecarConfig
    from monitor.receive.batch import BatchGroup, decode_batch
    from monitor.sidecar import Sidecar
    from tests.sidecar.test_sidecar_grpc import rows
    from tests.support.plugin_client import PluginClient
    from tests.support.sidecar import fixture_config

    raw = fixture_config(tmp_path, 64, socket=None, grpc_port=None, metrics_port=None)
    sc = Sidecar(SidecarConfig.model_validate(raw))

    def part(step, positions, ids):
        n = len(positions)
        msg = PluginClient.batch(step, [1], rows(n, planted=[], seed=step), ["r"], [0] * n, positions, [True] * n)
        msg.batch.token_ids.extend(ids)
        return decode_batch(msg.batch, 64, {1}, 1 << 20, 1 << 16)

    try:
        parts = [part(1, [0, 1], [10, 11]), part(2, [2], []), part(3, [3], [13])]
        sc.pipeline.process(BatchGroup.of(parts), None, lambda stream, d: True)
        assert sc.requests.tokens.known(sc.requests.get("r").token_row) == {0: 10, 1: 11, 3: 13}
        sc.pipeline.process(BatchGroup.of([part(4, [4], [14]), part(5, [5], [15])]), None, lambda stream, d: True)
        assert sc.requests.context_ids("r", 5) == (3, [13, 14, 15])  # position 2 came without its id
    finally:
        sc.events.close()


def test_decode_batch_takes_none_or_one_id_per_token_and_keeps_them_aligned():
    from monitor.receive.batch import BatchRejected, decode_batch
    from tests.support.plugin_client import PluginClient

    def msg(ids, positions=(0, 1, 2)):
        m = PluginClient.batch(1, [1], np.zeros((1, 3, 8), np.float32), ["a", "b"], [0, 1, 0], list(positions),
                               [False] * 3).batch
        m.token_ids.extend(ids)
        return m

    assert decode_batch(msg([]), 8, {1}, 1 << 20, 1 << 16).token_ids is None
    assert decode_batch(msg([7, 8, 9]), 8, {1}, 1 << 20, 1 << 16).token_ids.tolist() == [7, 8, 9]
    for wrong in ([7], [7, 8, 9, 10]):
        with pytest.raises(BatchRejected) as exc:
            decode_batch(msg(wrong), 8, {1}, 1 << 20, 1 << 16)
        assert exc.value.reason == "malformed" and f"{len(wrong)} token ids for 3 tokens" in exc.value.detail
    # request b's position is out of range: its rows go, and its id with them
    kept = decode_batch(msg([7, 8, 9], positions=(0, 1 << 40, 2)), 8, {1}, 1 << 20, 1 << 16, max_position=1 << 30)
    assert kept.token_ids.tolist() == [7, 9] and kept.positions.tolist() == [0, 2]
