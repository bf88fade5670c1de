"""Alert and state-change webhooks: targets, signing, the outbox, delivery."""
