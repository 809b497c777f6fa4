#!/bin/sh
# Headless Chromium for tests/test_dashboard_browser.py, part of the README's test command.
# Present: nothing to do. Missing: installed from Debian's packages when this runs as root or with
# password-less sudo. Otherwise this only warns (so the rest of the suite still runs) and the browser
# test fails with what to install, or with WRITESAE_CHROMIUM / WRITESAE_CHROMEDRIVER to point at a
# Chrome or Chromium and its chromedriver.
if { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then exit 0; fi
if [ -n "$WRITESAE_CHROMIUM" ] && [ -n "$WRITESAE_CHROMEDRIVER" ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        as_root=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root="sudo -n"
    else
        as_root="no"
    fi
    if [ "$as_root" != "no" ]; then
        echo "installing Debian's chromium and chromium-driver for the dashboard's browser test" >&2
        $as_root apt-get update -qq &&
            $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver &&
            exit 0
    fi
fi
echo "warning: no headless Chromium here, and it cannot be installed without root; tests/test_dashboard_browser.py" \
     "will fail. Install Debian's chromium and chromium-driver (sudo apt-get install chromium chromium-driver), or set" \
     "WRITESAE_CHROMIUM and WRITESAE_CHROMEDRIVER." >&2
exit 0
