#!/bin/sh
# Regenerates docs/screenshots/chat.png and console.png (shown in the README) from the
# browser tests of the chat page and the console, in headless Chromium.
set -eu
cd "$(dirname "$0")/.."
cargo build --quiet
CORELAY_SCREENSHOTS_DIR=docs/screenshots node --test --test-concurrency=1 \
  tests/e2e/chat-page.test.mjs tests/e2e/console.test.mjs
