"""`nesterov = false` end to end: workers and an aggregator in threads, the committed weights and
momentum against heavy-ball momentum computed independently (tests/reference.py) from the workers'
local weights."""

from __future__ import annotations

from diloco import keys, runs
from diloco.messages import Announcement
from diloco.store import open_store
from tests import reference
from tests.test_pipeline import committed, run_pipeline


def test_a_run_without_nesterov_takes_heavy_ball_steps(redis_url, file_url, r):
    """b = mu*b + d; theta -= lr*b, over three versions, so the momentum carries from one to the next.

    Kills the mutants that ignore the setting: the aggregator calling `outer_step` without
    `nesterov=self.cfg.nesterov` (Nesterov's default), and `outer_step` passing `nesterov=True` to SGD
    whatever it is given. Nesterov's first step alone is 1.9 times heavy ball's at mu 0.9."""
    lr, mu = 0.7, 0.9
    cfg, head0, rec, entries = run_pipeline(redis_url, file_url, r, 2, 3, outer_lr=lr, outer_momentum=mu,
                                            nesterov=False)
    assert cfg.nesterov is False and runs.load_config(r, "t").nesterov is False
    store = open_store(file_url)
    theta, b = runs.load_weights(store, head0), runs.load_momentum(store, head0)
    assert [(int(e["version"]), e["participants"]) for e in entries] == [(1, "w0,w1"), (2, "w0,w1"), (3, "w0,w1")]
    for entry in entries:
        anns = [Announcement.from_fields(r.xrange(keys.deltas("t"), i, i)[0][1]) for i in entry["entries"].split(",")]
        assert int(entry["bytes"]) == sum(a.nbytes for a in anns), "the round's bytes are its deltas' bytes"
        base = int(entry["version"]) - 1
        deltas = [{n: theta[n].double() - local[n].double() for n in theta if theta[n].is_floating_point()}
                  for _, local in sorted(rec.local[base].items())]
        theta, b = reference.outer_step(theta, b, deltas, lr=lr, mu=mu, nesterov=False)
        new_w, new_m = committed(store, entry)
        reference.assert_close(new_w, theta, f"weights of version {entry['version']}")
        reference.assert_close(new_m, b, f"momentum of version {entry['version']}")
        theta = new_w   # the next round trains from what was committed
