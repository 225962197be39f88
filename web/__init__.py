"""The web app ``wanbatch serve`` runs: fal's webhooks at ``POST /webhooks/fal``."""
