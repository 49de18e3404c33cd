"""THE URL redactor: credentials inside URLs never reach output (params, tags, artifacts, ledger
reasons, status, stdout, logs).

Credential-bearing URLs (``postgresql://user:pw@host/db``, ``http://user:token@mlflow``,
``https://host/x?token=…``) enter fp4roll only through the environment (``FP4ROLL_DB_URL``,
``MLFLOW_TRACKING_URI``) or a pydantic ``SecretStr``; flow parameters refuse them
(:func:`has_credentials`). Whatever text is about to be shown or stored goes through
:func:`redact_urls`; log records through :func:`install_log_redaction` (CLI and flows install it).

* user-info: everything between ``scheme://`` and the LAST ``@`` of the authority (a password
  with an unencoded ``@`` is still covered) becomes ``***``;
* secret query values (``password``, ``token``, ``access_token``, ``secret``, ``api_key``,
  ``sig``/``signature``, ``X-Amz-Credential``/``X-Amz-Signature``/``X-Amz-Security-Token``, …)
  become ``***``.

Linear time: both patterns are single passes without nested quantifiers. No dependencies.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]{0,30}://)[^\s/?#@\"'<>]*(?:@[^\s/?#@\"'<>]*)*@"
)
_SECRET_KEYS = (
    r"password|passwd|pwd|pass|token|access_token|refresh_token|id_token|auth|authorization|"
    r"secret|client_secret|api[_-]?key|apikey|access[_-]?key|sig|signature|"
    r"x-amz-credential|x-amz-signature|x-amz-security-token"
)
_SECRET_QUERY = re.compile(rf"(?P<key>[?&;](?:{_SECRET_KEYS})=)[^&;#\s\"']*", re.IGNORECASE)
_SECRET_QUERY_KEY = re.compile(rf"^(?:{_SECRET_KEYS})$", re.IGNORECASE)
MASK = "***"


def redact_urls(text: str) -> str:
    """``text`` with every URL's user-info and secret query values replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    return _SECRET_QUERY.sub(rf"\g<key>{MASK}", text)


def redact_strings(value: Any) -> Any:
    """``value`` with every string inside (dict values and keys, list/tuple items) redacted."""
    if isinstance(value, str):
        return redact_urls(value)
    if isinstance(value, Mapping):
        return {redact_strings(k): redact_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_strings(v) for v in value)
    return value


def has_credentials(url: str) -> bool:
    """True when ``url`` carries a password (``user:pw@``), a bare user-info on HTTP(S) (a token
    as user name), or a secret query parameter. ``postgresql://user@host`` alone is not one."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_urls(url) != url
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        # a password always; a bare user name only where it is the usual place for a token
        if ":" in userinfo or parts.scheme.lower() in ("http", "https"):
            return True
    return any(_SECRET_QUERY_KEY.match(key) for key, _ in parse_qsl(parts.query))


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Merge the record's arguments and redact the message; pre-render a redacted traceback."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record is left to the handler
        return record
    redacted = redact_urls(message)
    if redacted != message:
        record.msg, record.args = redacted, None
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        text = logging.Formatter().formatException(record.exc_info)
        if redact_urls(text) != text:
            record.exc_text = redact_urls(text)  # handlers use exc_text when it is set
    return record


_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process when it is created (a record factory), whatever
    handler (console, file, Prefect's API handler) it reaches later. Idempotent."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        return _redact_record(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    _installed = True
