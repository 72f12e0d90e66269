// Headless Chromium against the admin page of a running mailwarden, driven by
// tests/admin_browser.rs (which starts the proxy, holds the messages, and afterwards
// checks the next hop and the "remote" host). Debian's /usr/bin/chromium through
// playwright-core; no browser is downloaded.
//
// Input (environment):
//   ADMIN_URL       http://127.0.0.1:PORT
//   ADMIN_TOKEN     the admin token
//   PLAIN_ID        a held plain-text message to release
//   PLAIN_MARKER    text in its body
//   EVIL_ID         a held message whose HTML has <script> and a remote <img>
//   REMOTE_ORIGIN   the origin its remote content points at (must never be requested)
//   SCREENSHOT      where to save the dashboard screenshot
//   ENTRY_SCREENSHOT (optional) where to save the hostile message's entry view
//   USER_DATA_DIR   a fresh, empty profile directory
//   CHROMIUM        browser executable (default /usr/bin/chromium)
//
// Output: one JSON line on stdout ({"ok": true, ...} or {"ok": false, "error": ...});
// exit status 0 only when every check passed.

import { chromium } from 'playwright-core';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`missing environment variable ${name}`);
  return v;
};

const ADMIN_URL = env('ADMIN_URL');
const TOKEN = env('ADMIN_TOKEN');
const PLAIN_ID = env('PLAIN_ID');
const PLAIN_MARKER = env('PLAIN_MARKER');
const EVIL_ID = env('EVIL_ID');
const REMOTE_ORIGIN = env('REMOTE_ORIGIN');
const SCREENSHOT = env('SCREENSHOT');
const ENTRY_SCREENSHOT = process.env.ENTRY_SCREENSHOT;
const USER_DATA_DIR = env('USER_DATA_DIR');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const STEP = 20000;

const requests = [];
const dialogs = [];
const pageErrors = [];
const consoleErrors = [];
const steps = [];

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  steps.push(what);
}

async function main() {
  const context = await chromium.launchPersistentContext(USER_DATA_DIR, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1280, height: 900 },
    acceptDownloads: false,
  });
  let page;
  try {
    context.on('request', (r) => requests.push(r.url()));
    page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(STEP);
    page.on('dialog', async (d) => {
      dialogs.push(`${d.type()}: ${d.message()}`);
      await d.dismiss().catch(() => {});
    });
    page.on('pageerror', (e) => pageErrors.push(String(e)));
    page.on('console', (m) => {
      if (m.type() === 'error') consoleErrors.push(m.text());
    });

    // 1. The page shell loads without the token; a wrong token is refused.
    await page.goto(ADMIN_URL + '/', { waitUntil: 'load' });
    await page.locator('#view-login').waitFor({ state: 'visible' });
    await page.fill('#token', 'definitely-not-the-token');
    await page.click('#login-form button[type=submit]');
    await page.locator('#login-error').waitFor({ state: 'visible' });
    check(/refused/i.test(await page.textContent('#login-error')), 'wrong token is refused');
    check(await page.locator('#view-dashboard').isHidden(), 'no dashboard without the token');

    // 2. Log in: the dashboard with its chart.
    await page.fill('#token', TOKEN);
    await page.click('#login-form button[type=submit]');
    await page.locator('#view-dashboard').waitFor({ state: 'visible' });
    await page.locator('#chart-svg rect.bar').first().waitFor({ state: 'attached' });
    const bars = await page.locator('#chart-svg rect.bar').count();
    check(bars > 0, `the chart has bars (${bars})`);
    const held = await page.textContent('#held-count');
    check(Number(held) >= 2, `dashboard shows held messages (${held})`);
    check((await page.textContent('#policy-badge')).startsWith('policy '), 'policy version shown');
    const stored = await page.evaluate(() => Object.keys(sessionStorage));
    check(stored.length === 1, 'the token is kept in sessionStorage');
    const cookies = await context.cookies();
    check(cookies.length === 0, 'no cookies');
    await page.screenshot({ path: SCREENSHOT, fullPage: true });

    // 3. The quarantine list shows the held message; open it.
    await page.click('#nav a[data-view=quarantine]');
    const row = page.locator(`#qtable tr[data-id="${PLAIN_ID}"]`);
    await row.waitFor({ state: 'visible' });
    check(true, 'held message listed');
    await page.locator(`#qtable tr[data-id="${EVIL_ID}"]`).waitFor({ state: 'visible' });
    // Filters narrow the list.
    await page.fill('#filters input[name=from]', 'alice@');
    await page.click('#filters button[type=submit]');
    await page.locator(`#qtable tr[data-id="${EVIL_ID}"]`).waitFor({ state: 'detached' });
    check(await row.isVisible(), 'filter keeps the matching entry and hides the other');
    await page.fill('#filters input[name=from]', '');
    await page.click('#filters button[type=submit]');
    await page.locator(`#qtable tr[data-id="${EVIL_ID}"]`).waitFor({ state: 'visible' });
    await row.locator('a.entry-link').click();
    await page.locator('#view-entry').waitFor({ state: 'visible' });
    await page.waitForFunction((m) => document.getElementById('entry-preview').textContent.includes(m), PLAIN_MARKER);
    check((await page.textContent('#meta-id')) === PLAIN_ID, 'entry view shows the id');
    check((await page.textContent('#meta-state')) === 'held', 'entry is held');

    // 4. Release it.
    await page.click('#release');
    await page.locator('#entry-result').waitFor({ state: 'visible' });
    const result = await page.textContent('#entry-result');
    check(result.startsWith('Released'), `release reported: ${result}`);
    await page.waitForFunction(() => document.getElementById('meta-state').textContent === 'released');
    check(await page.isDisabled('#release'), 'release button disabled afterwards');

    // 5. The hostile message: nothing runs, nothing loads.
    await page.goto(ADMIN_URL + '/#/entry/' + EVIL_ID, { waitUntil: 'load' });
    await page.locator('#view-entry').waitFor({ state: 'visible' });
    await page.waitForFunction(() => document.getElementById('entry-preview').textContent.length > 0);
    await page.waitForTimeout(1500); // time for any image, frame or script to try
    const preview = await page.textContent('#entry-preview');
    check(preview.includes('EVIL-VISIBLE-TEXT'), 'the text of the HTML part is shown');
    const subject = await page.textContent('#entry-subject');
    check(subject.includes('<img'), `markup in the subject is shown as text: ${subject}`);
    const dom = await page.evaluate(() => ({
      pwned: window.__mw_pwned,
      imgs: document.images.length,
      iframes: document.querySelectorAll('iframe, frame, object, embed').length,
      scripts: Array.from(document.scripts).map((s) => s.src),
    }));
    check(dom.pwned === undefined, `no script of the message ran (__mw_pwned=${dom.pwned})`);
    check(dom.imgs === 0, `no <img> element in the page (${dom.imgs})`);
    check(dom.iframes === 0, 'no frame or object in the page');
    check(dom.scripts.length === 1 && dom.scripts[0] === ADMIN_URL + '/app.js', `only app.js: ${dom.scripts}`);
    if (ENTRY_SCREENSHOT) await page.screenshot({ path: ENTRY_SCREENSHOT, fullPage: true });
    // 6. Delete it through the page (two-step button, no native dialog).
    await page.click('#delete');
    await page.click('#delete-confirm');
    await page.locator('#view-quarantine').waitFor({ state: 'visible' });
    await page.locator(`#qtable tr[data-id="${PLAIN_ID}"]`).waitFor({ state: 'detached' });
    check(await page.locator(`#qtable tr[data-id="${EVIL_ID}"]`).count() === 0, 'hostile message deleted');
    check((await page.textContent('#notice')).startsWith('Deleted'), 'deletion reported');

    check(dialogs.length === 0, `no dialog opened: ${dialogs}`);
    const foreign = requests.filter((u) => !u.startsWith(ADMIN_URL + '/'));
    check(foreign.length === 0, `no request left the admin origin: ${foreign}`);
    check(!requests.some((u) => u.startsWith(REMOTE_ORIGIN)), 'nothing requested from the remote host');
    check(pageErrors.length === 0, `no page errors: ${pageErrors}`);
  } catch (e) {
    if (page) {
      await page.screenshot({ path: SCREENSHOT.replace(/\.png$/, '-failure.png'), fullPage: true }).catch(() => {});
    }
    throw e;
  } finally {
    await context.close();
  }
}

main().then(
  () => {
    console.log(JSON.stringify({ ok: true, steps, requests, consoleErrors }));
    process.exit(0);
  },
  (e) => {
    console.log(JSON.stringify({ ok: false, error: String(e && e.stack ? e.stack : e), steps, requests, dialogs, pageErrors, consoleErrors }));
    process.exit(1);
  },
);
