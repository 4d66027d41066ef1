"""The worker process: one per loaded model, speaking the protocol over a DEALER socket."""
