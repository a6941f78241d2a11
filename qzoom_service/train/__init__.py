"""Training: the base model for models built from scratch, and the two small Q-Zoom branches
(paper arXiv 2604.06912; the reference implementation is github.com/YuHengsss/Q-Zoom).

One module per role; import from them directly (this package imports nothing, so mounting the CLI
stays cheap):

    data.py         JSONL records, validated with row-numbered errors
    inputs.py       square padding, fixed-budget encoding, frozen trunk to layer K
    base.py         the base model itself (trunk, vision tower, LM head) on coarse and fused sequences
    teacher.py      stage-1 teacher: greedy answer, answer-to-image attention rows
    rpn_labels.py   stage-1 pseudo labels (raw maps, tri-state rules), ground-truth-box labels
    gate_labels.py  stage-3 answer ladders, consistency filter, per-load label draw, held-out split
    loop.py         AdamW + warm-up/cosine + clipping, resumable plan, early stop
    checkpoint.py   atomic resumable checkpoints, released-layout export
    train_heads.py  train_rpn / train_gate / evaluate_rpn / evaluate_gate / gate_calibration
    calibrate.py    teacher hit rate, RoI threshold calibration, gate threshold choice
    cli.py          `qzoom train rpn-labels | rpn | calibrate-roi | gate-labels | gate`

The recipe of the embedded model (recipes/train_embedded_model.py) is built from these.
"""
