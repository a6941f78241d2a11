"""Ray Serve application: a gRPC `CoarseGate` ingress and a `Zoom` deployment (see app.py)."""
