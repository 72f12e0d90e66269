// The admin page's "What if" view in headless Chromium, driven by tests/whatif_browser.rs
// (which starts the proxy, sends the mail that fills the decision log, and checks the
// numbers shown against what it sent). Debian's /usr/bin/chromium through playwright-core.
//
// Input (environment): ADMIN_URL, ADMIN_TOKEN, POLICY_FILE (a policy file to upload),
// EXPECT_HELD_TO_ACCEPT, EXPECT_UNCHANGED_ACCEPT (matrix cells), EXPECT_CHANGED_IDS
// (comma-separated Message-IDs), SCREENSHOT, USER_DATA_DIR, CHROMIUM.
// Output: one JSON line on stdout; exit status 0 only when every check passed.

import { chromium } from 'playwright-core';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`missing environment variable ${name}`);
  return v;
};

const ADMIN_URL = env('ADMIN_URL');
const steps = [];
const pageErrors = [];
const requests = [];

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  steps.push(what);
}

async function cell(page, oldAction, newAction) {
  return Number(await page.textContent(`#whatif-matrix tr[data-old="${oldAction}"] td[data-new="${newAction}"]`));
}

async function main() {
  const context = await chromium.launchPersistentContext(env('USER_DATA_DIR'), {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
    viewport: { width: 1280, height: 1000 },
  });
  try {
    context.on('request', (r) => requests.push(r.url()));
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(20000);
    page.on('pageerror', (e) => pageErrors.push(String(e)));

    await page.goto(ADMIN_URL + '/', { waitUntil: 'load' });
    await page.fill('#token', env('ADMIN_TOKEN'));
    await page.click('#login-form button[type=submit]');
    await page.locator('#view-dashboard').waitFor({ state: 'visible' });

    await page.click('#nav a[data-view=whatif]');
    await page.locator('#view-whatif').waitFor({ state: 'visible' });
    check(await page.locator('#whatif-result').isHidden(), 'no result before a replay');

    // A broken policy: the error names the line and key, and no matrix is shown.
    await page.fill('#whatif-policy', '[[rule]]\nname = "x"\naction = "explode"\n');
    await page.click('#whatif-run');
    await page.locator('#whatif-error').waitFor({ state: 'visible' });
    const error = await page.textContent('#whatif-error');
    check(/what-if\.toml:3/.test(error) && /action/.test(error), `policy error shown: ${error}`);
    check(await page.locator('#whatif-result').isHidden(), 'no matrix for a broken policy');

    // Upload the new policy: it fills the text area; replay it.
    await page.setInputFiles('#whatif-file', env('POLICY_FILE'));
    await page.waitForFunction(() => document.getElementById('whatif-policy').value.includes('[[rule]]'));
    check(true, 'the uploaded file fills the policy text');
    await page.click('#whatif-run');
    await page.locator('#whatif-result').waitFor({ state: 'visible' });
    check(await page.locator('#whatif-error').isHidden(), 'no error');
    const heldToAccept = await cell(page, 'quarantine', 'accept');
    check(heldToAccept === Number(env('EXPECT_HELD_TO_ACCEPT')), `quarantine→accept = ${heldToAccept}`);
    const acceptKept = await cell(page, 'accept', 'accept');
    check(acceptKept === Number(env('EXPECT_UNCHANGED_ACCEPT')), `accept→accept = ${acceptKept}`);
    check(await cell(page, 'quarantine', 'quarantine') === 0, 'quarantine→quarantine = 0');
    const changedCell = page.locator('#whatif-matrix tr[data-old="quarantine"] td[data-new="accept"]');
    check((await changedCell.getAttribute('class')).includes('changed'), 'the changed cell is marked');
    const rules = await changedCell.getAttribute('title');
    check(rules.includes('hold-all → signed'), `the rules responsible are named: ${rules}`);
    const rows = await page.locator('#whatif-changed tbody tr').allTextContents();
    for (const id of env('EXPECT_CHANGED_IDS').split(',')) {
      check(rows.some((r) => r.includes(id)), `changed list has ${id}`);
    }
    check(rows.length === env('EXPECT_CHANGED_IDS').split(',').length, `only the changed ones (${rows.length})`);
    const summary = await page.textContent('#whatif-summary');
    check(summary.includes('would change action'), `summary: ${summary}`);
    await page.screenshot({ path: env('SCREENSHOT'), fullPage: true });
    check(pageErrors.length === 0, `no page errors: ${pageErrors}`);
    const foreign = requests.filter((u) => !u.startsWith(ADMIN_URL + '/'));
    check(foreign.length === 0, `no request left the admin origin: ${foreign}`);
  } finally {
    await context.close();
  }
}

main().then(
  () => {
    console.log(JSON.stringify({ ok: true, steps }));
    process.exit(0);
  },
  (e) => {
    console.log(JSON.stringify({ ok: false, error: String(e && e.stack ? e.stack : e), steps, pageErrors }));
    process.exit(1);
  },
);
