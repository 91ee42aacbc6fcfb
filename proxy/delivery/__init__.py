"""Progressive delivery: rollouts (steps, analysis, promote, roll back), the A/B report and client feedback.

Pure parts: `significance.py` (statistics), `analysis.py` (verdicts), `state.py` (transitions), `weights.py`
and `experiments.py`. I/O: `controller.py` (store, lease, ticks), `views.py` (HTTP), `client.py` (CLI).
"""
