"""Browser tests' shared parts: Debian's chromium (never a downloaded browser) and a page
that records what it said (console errors, page errors, JavaScript dialogs)."""

from __future__ import annotations

from playwright.sync_api import ConsoleMessage, Dialog, Page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests run as root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # this machine's closed network refuses Google's hosts
    "--disable-component-update",
    "--disable-sync",
]


class Watched:
    """A page plus what it said: console errors, page errors and any JavaScript dialog."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.console.append(f"pageerror: {exc}"))
        page.on("dialog", self._dialog)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console.append(message.text)

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def errors(self, allow_401: bool = False) -> list[str]:
        expected = "the server responded with a status of 401"
        return [m for m in self.console if not (allow_401 and expected in m)]
