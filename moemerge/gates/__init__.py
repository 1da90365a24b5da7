"""Router (gate) weights, one module per gate mode; every mode returns float32 [layers, experts, hidden]."""
