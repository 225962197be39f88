"""The contract's settings in a few words each: the one list ``wanbatch --help`` prints.

Standard library only, and nothing imported: ``wanbatch --help`` must answer without loading
pydantic-settings (:mod:`jobs.settings`, where the variables are read and checked, is a tenth of
a second of start-up). ``tests/unit/test_cli_help.py`` keeps the names and the defaults said
here the same as :class:`jobs.settings.Settings`'s, and the list the same as the contract's
configuration table. README "Configuration" has every variable, these and the others (timeouts,
retries, per-endpoint caps, prices), with the details.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SettingNote:
    """One environment variable: what it sets, and what holds when it is unset."""

    name: str
    words: str
    default: str

    @property
    def default_text(self) -> str:
        """``[default: …]``, the form click gives an option's default."""
        return f"[default: {self.default}]"


#: The contract's variables (CONTRACT.md "Configuration"), in its order.
CONTRACT_SETTINGS: tuple[SettingNote, ...] = (
    SettingNote("FAL_KEY", "fal API key (or FAL_KEY_ID + FAL_KEY_SECRET); `--simulate` needs none", "none"),
    SettingNote(
        "WANBATCH_DATABASE_URL",
        "database URL (sqlite:/// or postgresql://)",
        "sqlite:///.wanbatch/wanbatch.db",
    ),
    SettingNote(
        "WANBATCH_BROKER_URL", "Celery broker URL, for `wanbatch worker`s", "unset: work runs in-process"
    ),
    SettingNote("WANBATCH_FAL_QUEUE_URL", "fal's queue API", "https://queue.fal.run"),
    SettingNote("WANBATCH_FAL_REST_URL", "fal's REST API (storage uploads)", "https://rest.fal.ai"),
    SettingNote("WANBATCH_OUTPUT_DIR", "where videos go: a folder, or s3://bucket/prefix", "./outputs"),
    SettingNote("WANBATCH_SUBMIT_RATE", "submits per second, all workers and hosts together", "5"),
    SettingNote("WANBATCH_MAX_OUTSTANDING", "requests sent to fal and not yet completed, all together", "10"),
    SettingNote("WANBATCH_DOWNLOAD_TIMEOUT", "seconds one download attempt may take", "1800"),
    SettingNote(
        "WANBATCH_DOWNLOAD_ALLOWED_HOSTS",
        "hosts outputs may be fetched from, beyond the configured fal URLs (and fal's media "
        "hosts); loopback, private and link-local addresses are refused unless listed "
        "(comma-separated)",
        "none",
    ),
    SettingNote("WANBATCH_WEBHOOK_URL", "public URL of `serve`'s /webhooks/fal", "unset: no webhooks"),
    SettingNote(
        "WANBATCH_WEBHOOK_JWKS_URL",
        "fal's webhook signing keys (JWKS)",
        "https://rest.fal.ai/.well-known/jwks.json",
    ),
    SettingNote(
        "WANBATCH_MEDIA_MISMATCH", "an output of another size or length than asked: flag or fail", "flag"
    ),
    SettingNote(
        "WANBATCH_SERVE_TOKEN", "token the dashboard's actions require", "unset: read-only, loopback only"
    ),
    SettingNote("WANBATCH_LOG_FORMAT", "log lines as text or json", "text"),
)

#: The closing words of the list: where the rest is, and what checks it.
MORE_SETTINGS = (
    "More settings (timeouts, retries, per-endpoint caps, prices) and the details: README "
    '"Configuration". `wanbatch doctor` checks the configuration and says what to fix.'
)
