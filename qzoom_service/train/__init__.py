"""Training pipeline for the two small Q-Zoom branches (reference: shared/reference/qzoom-training.md).

One module per role; import from them directly (this package imports nothing, so mounting the CLI
stays cheap):

    data.py         JSONL records, validated with row-numbered errors
    inputs.py       square padding, fixed-budget encoding, frozen trunk to layer K
    teacher.py      stage-1 teacher: greedy answer, answer-to-image attention rows
    rpn_labels.py   stage-1 pseudo labels (raw maps, tri-state rules), ground-truth-box labels
    gate_labels.py  stage-3 answer ladders, consistency filter, per-load label draw
    loop.py         AdamW + warm-up/cosine + clipping, resumable plan
    checkpoint.py   atomic resumable checkpoints, released-layout export
    train_heads.py  train_rpn / train_gate / evaluate_rpn / evaluate_gate
    cli.py          `qzoom train rpn-labels | rpn | gate-labels | gate`
"""
