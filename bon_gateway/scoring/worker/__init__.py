"""The reward-model worker process (imports torch; the front process never imports this)."""
