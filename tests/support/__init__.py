"""What the tests share: tiny models, hostile-input runners, a fake Hub, gate references, the CLI path."""
