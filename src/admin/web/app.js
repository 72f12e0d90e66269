// mailwarden admin page. No framework, no build step, nothing from the internet.
//
// Safety rules of this file (checked by a unit test in src/admin/http.rs and enforced by
// the page's Content-Security-Policy with Trusted Types):
// * every text from the API is put in the page with textContent or as an SVG text node,
//   never parsed as HTML: no HTML-parsing sinks, no eval, no inline handlers;
// * the token lives in sessionStorage (this tab only) and is sent only in the
//   Authorization header of same-origin requests.
'use strict';

(function () {
  const TOKEN_KEY = 'mailwarden.admin.token';
  const COLORS = {
    accept: '#2e7d32',
    tag: '#1565c0',
    quarantine: '#ef6c00',
    defer: '#8e24aa',
    reject: '#c62828',
  };
  const FALLBACK_COLORS = ['#546e7a', '#00838f', '#6d4c41', '#9e9d24'];

  const $ = (id) => document.getElementById(id);

  // Builds an element: el('td', {className: 'num', text: '42'}, child, ...).
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    applyProps(node, props);
    for (const c of children) {
      if (c !== null && c !== undefined) node.append(c);
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const c of children) node.append(c);
    return node;
  }

  function applyProps(node, props) {
    if (!props) return;
    for (const [k, v] of Object.entries(props)) {
      if (v === undefined || v === null) continue;
      if (k === 'text') node.textContent = String(v);
      else if (k === 'className') node.className = v;
      else if (k === 'on') for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
      else if (k === 'href') node.setAttribute('href', safeHash(v));
      else node.setAttribute(k, String(v));
    }
  }

  // Links inside the page only ever point at a fragment of this page.
  function safeHash(h) {
    return typeof h === 'string' && h.startsWith('#/') ? h : '#/';
  }

  // ---------------------------------------------------------------------------
  // Token and API
  // ---------------------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, options) {
    const opts = options || {};
    const headers = { Authorization: 'Bearer ' + token() };
    let body;
    if (opts.json !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.json);
    }
    const res = await fetch(path, {
      method: opts.method || 'GET',
      headers,
      body,
      cache: 'no-store',
      credentials: 'omit',
      redirect: 'error',
    });
    if (res.status === 401) {
      signOut('The token was refused. Sign in again.');
      throw new ApiError(401, 'unauthorized', 'unauthorized');
    }
    if (opts.blob && res.ok) return res.blob();
    let data = null;
    try {
      data = await res.json();
    } catch (e) {
      data = null;
    }
    if (!res.ok) {
      const code = data && data.error ? data.error : 'http_' + res.status;
      const msg = data && data.message ? data.message : 'HTTP ' + res.status;
      throw new ApiError(res.status, code, msg);
    }
    return data;
  }

  function notice(text, isError) {
    const n = $('notice');
    if (!text) {
      n.hidden = true;
      return;
    }
    n.textContent = text;
    n.className = isError ? 'notice error' : 'notice';
    n.hidden = false;
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    $('nav').hidden = true;
    $('logout').hidden = true;
    $('policy-badge').hidden = true;
    showView('login');
    const err = $('login-error');
    if (message) {
      err.textContent = message;
      err.hidden = false;
    } else {
      err.hidden = true;
    }
  }

  // ---------------------------------------------------------------------------
  // Views
  // ---------------------------------------------------------------------------

  const VIEWS = ['login', 'dashboard', 'quarantine', 'entry', 'accounts', 'whatif'];
  let refreshTimer = null;
  // A message for the next view (e.g. "Deleted ..." after leaving the entry view).
  let pendingNotice = null;

  function showView(name) {
    for (const v of VIEWS) $('view-' + v).hidden = v !== name;
    for (const a of document.querySelectorAll('#nav a')) {
      a.classList.toggle('active', a.dataset.view === name || (name === 'entry' && a.dataset.view === 'quarantine'));
    }
    if (refreshTimer) {
      clearInterval(refreshTimer);
      refreshTimer = null;
    }
  }

  async function route() {
    if (!token()) {
      signOut();
      return;
    }
    $('nav').hidden = false;
    $('logout').hidden = false;
    notice(pendingNotice, false);
    pendingNotice = null;
    const hash = location.hash || '#/dashboard';
    const parts = hash.slice(2).split('/');
    try {
      if (parts[0] === 'quarantine') {
        showView('quarantine');
        await loadQuarantine();
      } else if (parts[0] === 'entry' && parts[1]) {
        showView('entry');
        await loadEntry(decodeURIComponent(parts[1]));
      } else if (parts[0] === 'whatif') {
        showView('whatif');
      } else if (parts[0] === 'accounts') {
        showView('accounts');
        $('account-detail').hidden = true;
        await loadAccounts();
      } else {
        showView('dashboard');
        await loadDashboard();
        refreshTimer = setInterval(() => loadDashboard().catch(() => {}), 30000);
      }
    } catch (e) {
      if (e.status !== 401) notice(e.message, true);
    }
  }

  // ---------------------------------------------------------------------------
  // Dashboard
  // ---------------------------------------------------------------------------

  function colorOf(action, i) {
    return COLORS[action] || FALLBACK_COLORS[i % FALLBACK_COLORS.length];
  }

  function fmtTime(secs) {
    const d = new Date(secs * 1000);
    return d.toTimeString().slice(0, 5);
  }

  function fmtDate(secs) {
    return new Date(secs * 1000).toISOString().replace('T', ' ').slice(0, 19) + ' UTC';
  }

  async function loadDashboard() {
    const hours = $('hours').value;
    const [stats, policy, recent, accounts] = await Promise.all([
      api('/api/stats?hours=' + encodeURIComponent(hours)),
      api('/api/policy'),
      api('/api/quarantine?limit=6'),
      api('/api/accounts'),
    ]);
    renderPolicy(policy);
    renderCards(stats, accounts);
    renderChart(stats.verdicts);
    renderRecent(recent.entries);
    renderFrozen(accounts);
  }

  function renderRecent(entries) {
    const rows = entries.map((r) => el('tr', {},
      el('td', { text: fmtTime(r.received_at), className: 'nowrap muted' }),
      el('td', { text: r.mail_from || '<>' }),
      el('td', {}, el('a', { href: '#/entry/' + encodeURIComponent(r.id), text: r.subject || '(no subject)', className: 'entry-link' })),
      el('td', { text: r.flags || r.reasons, className: 'muted nowrap' })));
    $('recent').querySelector('tbody').replaceChildren(...rows);
    $('recent-empty').hidden = rows.length > 0;
  }

  function renderFrozen(data) {
    const empty = $('frozen-empty');
    const tbody = $('frozen').querySelector('tbody');
    if (!data.available) {
      tbody.replaceChildren();
      empty.textContent = 'Outbound burst detection is off.';
      empty.hidden = false;
      return;
    }
    const frozen = data.accounts.filter((a) => a.frozen);
    tbody.replaceChildren(...frozen.map((a) => el('tr', {},
      el('td', {}, el('a', { href: '#/accounts', text: a.account, className: 'account-link' })),
      el('td', { text: a.frozen_until ? 'until ' + fmtDate(a.frozen_until) : 'until unfrozen', className: 'muted' }))));
    empty.textContent = `No account is frozen (${data.accounts.length} tracked, backend ${data.backend}).`;
    empty.hidden = frozen.length > 0;
  }

  function renderPolicy(p) {
    const badge = $('policy-badge');
    badge.textContent = 'policy ' + p.version;
    badge.hidden = false;
    const dl = $('policy');
    const reload = p.last_reload === null ? 'no reload since start' : (p.last_reload.ok ? 'ok: ' : 'FAILED: ') + p.last_reload.message;
    dl.replaceChildren(
      el('dt', { text: 'Version' }), el('dd', { text: p.version }),
      el('dt', { text: 'Last reload' }), el('dd', { text: reload, className: p.last_reload && !p.last_reload.ok ? 'error' : '' }),
    );
  }

  function renderCards(stats, accounts) {
    const t = stats.verdicts.totals || {};
    const q = stats.quarantine || {};
    const held = (q.held || 0) + (q.releasing || 0);
    const cards = [];
    stats.verdicts.actions.forEach((a, i) => {
      const card = el('div', { className: 'stat' },
        el('span', { className: 'swatch', 'data-action': a }),
        el('span', { className: 'label action', text: a }),
        el('span', { className: 'value', text: String(t[a] || 0) }));
      card.querySelector('.swatch').style.background = colorOf(a, i);
      cards.push(card);
    });
    cards.push(el('div', { className: 'stat' },
      el('span', { className: 'label', text: 'Held now' }),
      el('span', { className: 'value', id: 'held-count', text: String(held) })));
    if (accounts.available) {
      cards.push(el('div', { className: 'stat' },
        el('span', { className: 'label', text: 'Frozen accounts' }),
        el('span', { className: 'value', id: 'frozen-count', text: String(accounts.accounts.filter((a) => a.frozen).length) })));
    }
    $('cards').replaceChildren(...cards);
  }

  function renderChart(v) {
    const W = 900, H = 260, L = 44, R = 10, T = 10, B = 28;
    const n = v.buckets.length || 1;
    const totals = v.buckets.map((b) => Object.values(b.counts).reduce((s, x) => s + x, 0));
    const max = Math.max(1, ...totals);
    const step = niceStep(max);
    const top = Math.ceil(max / step) * step;
    const bw = (W - L - R) / n;
    const y = (val) => T + (H - T - B) * (1 - val / top);
    const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'verdicts over time', id: 'chart-svg' });
    for (let g = 0; g <= top; g += step) {
      root.append(svg('line', { x1: L, x2: W - R, y1: y(g), y2: y(g), class: 'grid' }));
      root.append(svg('text', { x: L - 6, y: y(g) + 4, class: 'axis', 'text-anchor': 'end' }, String(g)));
    }
    const labelEvery = Math.max(1, Math.ceil(n / 8));
    v.buckets.forEach((b, i) => {
      let acc = 0;
      const x = L + i * bw;
      v.actions.forEach((a, ai) => {
        const c = b.counts[a] || 0;
        if (!c) return;
        const y0 = y(acc), y1 = y(acc + c);
        acc += c;
        const rect = svg('rect', {
          x: x + 1, y: y1, width: Math.max(1, bw - 2), height: Math.max(1, y0 - y1),
          fill: colorOf(a, ai), class: 'bar', 'data-action': a,
        });
        rect.append(svg('title', {}, `${fmtTime(b.start)}  ${a}: ${c}`));
        root.append(rect);
      });
      if (i % labelEvery === 0) {
        root.append(svg('text', { x: x + bw / 2, y: H - 8, class: 'axis', 'text-anchor': 'middle' }, fmtTime(b.start)));
      }
    });
    root.append(svg('line', { x1: L, x2: W - R, y1: y(0), y2: y(0), class: 'baseline' }));
    $('chart').replaceChildren(root);
    const legend = v.actions.map((a, i) => {
      const sw = el('span', { className: 'swatch' });
      sw.style.background = colorOf(a, i);
      return el('span', { className: 'item' }, sw, el('span', { text: a }));
    });
    legend.push(el('span', { className: 'muted small', text: `bars of ${Math.round(v.bucket_seconds / 60)} min` }));
    $('legend').replaceChildren(...legend);
  }

  function niceStep(max) {
    const raw = max / 4;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * mag >= raw) return Math.max(1, m * mag);
    return Math.max(1, 10 * mag);
  }

  // ---------------------------------------------------------------------------
  // Quarantine list
  // ---------------------------------------------------------------------------

  function filterQuery() {
    const f = $('filters');
    const q = new URLSearchParams();
    for (const name of ['since', 'reason', 'from', 'rcpt', 'limit']) {
      const v = f.elements[name].value.trim();
      if (v) q.set(name, v);
    }
    if (f.elements.all.checked) q.set('all', 'true');
    return q.toString();
  }

  async function loadQuarantine() {
    const qs = filterQuery();
    const data = await api('/api/quarantine' + (qs ? '?' + qs : ''));
    const tbody = $('qtable').querySelector('tbody');
    const rows = data.entries.map((r) => {
      const link = el('a', { href: '#/entry/' + encodeURIComponent(r.id), text: r.subject || '(no subject)', className: 'entry-link' });
      return el('tr', { 'data-id': r.id },
        el('td', { text: fmtDate(r.received_at), className: 'nowrap' }),
        el('td', { text: r.header_from || r.mail_from || '<>' }),
        el('td', { text: r.rcpts }),
        el('td', {}, link),
        el('td', { text: r.flags || r.reasons }),
        el('td', {}, el('span', { className: 'state state-' + r.state, text: r.state })),
        el('td', { text: fmtSize(r.size), className: 'num' }));
    });
    tbody.replaceChildren(...rows);
    $('qempty').hidden = rows.length > 0;
    const counts = Object.entries(data.counts).map(([s, n]) => `${n} ${s}`).join(', ');
    $('counts').textContent = `${rows.length} shown. In store: ${counts || 'nothing'}.`;
  }

  function fmtSize(n) {
    if (n < 1024) return n + ' B';
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + ' KiB';
    return (n / 1024 / 1024).toFixed(1) + ' MiB';
  }

  // ---------------------------------------------------------------------------
  // One entry
  // ---------------------------------------------------------------------------

  let currentId = null;

  async function loadEntry(id) {
    currentId = id;
    resetDelete();
    $('entry-result').hidden = true;
    $('release-to').value = '';
    $('release-force').checked = false;
    const data = await api('/api/quarantine/' + encodeURIComponent(id));
    renderEntry(data);
  }

  function renderEntry(data) {
    const m = data.meta;
    $('entry-subject').textContent = m.subject || '(no subject)';
    const rows = [
      ['ID', m.id],
      ['State', m.state],
      ['Received', fmtDate(m.received_at)],
      ['Client', `${m.client} (HELO ${m.helo})`],
      ['Envelope from', m.mail_from || '<>'],
      ['Envelope to', m.rcpts.join(', ')],
      ['Size', fmtSize(m.size)],
      ['Verdict', m.verdict],
      ['Reasons', m.reasons.join('; ')],
      ['Flags', m.flags.join(', ')],
      ['Authentication-Results', m.authentication_results],
    ];
    const dl = [];
    for (const [k, v] of rows) {
      dl.push(el('dt', { text: k }), el('dd', { text: v, id: 'meta-' + k.toLowerCase().replace(/[^a-z]+/g, '-') }));
    }
    $('entry-meta').replaceChildren(...dl);
    const hrows = data.headers.map((h) => el('tr', {}, el('th', { text: h.name }), el('td', { text: h.value })));
    $('entry-headers').querySelector('tbody').replaceChildren(...hrows);
    $('entry-preview').textContent = data.preview;
    const done = m.state !== 'held' && m.state !== 'releasing';
    $('release').disabled = done;
  }

  function result(text, isError) {
    const r = $('entry-result');
    r.textContent = text;
    r.className = isError ? 'result error' : 'result ok';
    r.hidden = false;
  }

  async function release() {
    const id = currentId;
    const to = $('release-to').value.split(/[\s,;]+/).filter((s) => s);
    const body = { force: $('release-force').checked };
    if (to.length) body.to = to;
    $('release').disabled = true;
    try {
      const r = await api('/api/quarantine/' + encodeURIComponent(id) + '/release', { method: 'POST', json: body });
      result(`Released: next hop answered ${r.reply}`, false);
      const data = await api('/api/quarantine/' + encodeURIComponent(id));
      renderEntry(data);
    } catch (e) {
      if (e.status !== 401) result(`Not released: ${e.message}`, true);
      $('release').disabled = false;
    }
  }

  function resetDelete() {
    $('delete').hidden = false;
    $('delete-confirm').hidden = true;
    $('delete-cancel').hidden = true;
  }

  async function doDelete() {
    const id = currentId;
    try {
      await api('/api/quarantine/' + encodeURIComponent(id) + '/delete', { method: 'POST', json: {} });
      pendingNotice = `Deleted ${id}.`;
      location.hash = '#/quarantine';
    } catch (e) {
      resetDelete();
      if (e.status !== 401) result(`Not deleted: ${e.message}`, true);
    }
  }

  async function download() {
    const id = currentId;
    try {
      const blob = await api('/api/quarantine/' + encodeURIComponent(id) + '/raw', { blob: true });
      const url = URL.createObjectURL(new Blob([blob], { type: 'application/octet-stream' }));
      const a = el('a', { download: id + '.eml' });
      a.href = url;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      if (e.status !== 401) result(`Download failed: ${e.message}`, true);
    }
  }

  // ---------------------------------------------------------------------------
  // Accounts
  // ---------------------------------------------------------------------------

  async function loadAccounts() {
    const data = await api('/api/accounts');
    const note = $('accounts-note');
    const tbody = $('atable').querySelector('tbody');
    if (!data.available) {
      note.textContent = 'Outbound burst detection is off ([outbound] enabled = false, or no submission listener): no accounts to show.';
      tbody.replaceChildren();
      return;
    }
    const accounts = data.accounts || [];
    const frozen = accounts.filter((a) => a.frozen).length;
    note.textContent = `${accounts.length} accounts tracked, ${frozen} frozen. Backend: ${data.backend}.`;
    // Frozen accounts first (the API already orders them so; keep it if not).
    accounts.sort((a, b) => (b.frozen ? 1 : 0) - (a.frozen ? 1 : 0));
    tbody.replaceChildren(...accounts.map(accountRow));
  }

  function windowsText(ws) {
    return (ws || []).map((w) => {
      const lim = w.max_messages === null || w.max_messages === undefined ? '∞' : w.max_messages;
      return `${w.window}: ${w.messages}/${lim}`;
    }).join(' · ');
  }

  function accountRow(a) {
    const reason = el('input', { placeholder: a.frozen ? 'why unfreeze' : 'why freeze', size: '14' });
    const button = el('button', {
      type: 'button',
      className: a.frozen ? '' : 'danger',
      text: a.frozen ? 'Unfreeze' : 'Freeze',
      'data-account': a.account,
      on: {
        click: async () => {
          button.disabled = true;
          try {
            await api('/api/accounts/' + encodeURIComponent(a.account) + (a.frozen ? '/unfreeze' : '/freeze'), {
              method: 'POST',
              json: { reason: reason.value.trim() },
            });
            await loadAccounts();
          } catch (e) {
            button.disabled = false;
            if (e.status !== 401) notice(e.message, true);
          }
        },
      },
    });
    const status = a.frozen
      ? el('span', { className: 'frozen-badge', text: a.frozen_until ? 'frozen until ' + fmtDate(a.frozen_until) : 'frozen' })
      : el('span', { className: 'active-badge', text: a.bulk ? 'active (bulk)' : 'active' });
    const name = el('a', { href: '#/accounts', text: a.account, className: 'account-link', on: { click: (ev) => { ev.preventDefault(); showAccount(a.account); } } });
    return el('tr', { className: a.frozen ? 'frozen' : '', 'data-account': a.account },
      el('td', {}, name),
      el('td', { text: a.last_seen ? fmtDate(a.last_seen) : '–', className: 'nowrap' }),
      el('td', { text: windowsText(a.windows) }),
      el('td', { text: a.baseline_messages_per_hour === null || a.baseline_messages_per_hour === undefined ? '–' : a.baseline_messages_per_hour.toFixed(1), className: 'num' }),
      el('td', {}, status),
      el('td', { className: 'nowrap' }, reason, ' ', button));
  }

  async function showAccount(account) {
    try {
      const d = await api('/api/accounts/' + encodeURIComponent(account));
      $('account-detail-title').textContent = d.account;
      const f = d.frozen;
      const rows = [
        ['Messages (total)', String(d.messages_total)],
        ['Last seen', d.last_seen ? fmtDate(d.last_seen) : '–'],
        ['Policy', d.policy || 'default' + (d.bulk ? ' (bulk)' : '')],
        ['Counts / limits', windowsText(d.windows)],
        ['Frozen', f ? `since ${fmtDate(f.since)} by ${f.by}: ${f.why}` + (f.until ? ` (until ${fmtDate(f.until)})` : '') : 'no'],
        ['Login addresses', (d.login_ips || []).map((i) => i.ip + (i.new ? ' (new)' : '')).join(', ') || '–'],
      ];
      $('account-detail-meta').replaceChildren(...rows.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v })]));
      const hist = (d.history || []).slice().reverse().map((h) => el('tr', {},
        el('td', { text: fmtDate(h.at), className: 'nowrap' }),
        el('td', { text: h.action }),
        el('td', { text: h.by }),
        el('td', { text: h.why })));
      $('account-history').querySelector('tbody').replaceChildren(...hist);
      $('account-detail').hidden = false;
    } catch (e) {
      if (e.status !== 401) notice(e.message, true);
    }
  }

  // ---------------------------------------------------------------------------
  // What if: the decision log replayed through a pasted policy
  // ---------------------------------------------------------------------------

  async function runWhatIf(ev) {
    ev.preventDefault();
    $('whatif-error').hidden = true;
    $('whatif-run').disabled = true;
    try {
      const r = await api('/api/policy/what-if', {
        method: 'POST',
        json: { policy: $('whatif-policy').value, hours: Number($('whatif-hours').value) },
      });
      showWhatIf(r);
    } catch (e) {
      if (e.status !== 401) {
        $('whatif-error').textContent = e.message;
        $('whatif-error').hidden = false;
        $('whatif-result').hidden = true;
      }
    } finally {
      $('whatif-run').disabled = false;
    }
  }

  function showWhatIf(r) {
    const actions = r.actions;
    $('whatif-summary').textContent =
      `${r.total} transactions replayed over the last ${r.hours} h; ${r.changed} would change action.`;
    $('whatif-warnings').replaceChildren(...(r.warnings || []).map((w) => el('li', { text: w })));
    const head = el('tr', null, el('th', { text: 'old \u2193 new \u2192' }),
      ...actions.map((a) => el('th', { className: 'num', text: a })));
    $('whatif-matrix').querySelector('thead').replaceChildren(head);
    const rows = actions.map((old) => el('tr', { 'data-old': old }, el('th', { text: old }),
      ...actions.map((now) => {
        const cell = r.matrix[old + '\u2192' + now];
        const n = cell ? cell.count : 0;
        const rules = cell ? Object.entries(cell.rules).map(([k, v]) => `${k}: ${v}`).join('\n') : '';
        return el('td', {
          className: 'num' + (n && old !== now ? ' changed' : ''),
          'data-new': now,
          title: rules,
          text: String(n),
        });
      })));
    $('whatif-matrix').querySelector('tbody').replaceChildren(...rows);
    const changed = (r.changed_list || []).map((e) => el('tr', null,
      el('td', { text: new Date(e.t).toISOString().replace('.000', '') }),
      el('td', { text: e.old }),
      el('td', { text: e.new }),
      el('td', { text: e.old_rule === e.new_rule ? e.new_rule : `${e.old_rule} \u2192 ${e.new_rule}` }),
      el('td', { text: e.client }),
      el('td', { text: e.mail_from }),
      el('td', { text: e.from || '' }),
      el('td', { text: e.message_id || '' })));
    $('whatif-changed').querySelector('tbody').replaceChildren(...changed);
    $('whatif-changed-empty').hidden = changed.length > 0;
    $('whatif-result').hidden = false;
  }

  async function loadWhatIfFile() {
    const f = $('whatif-file').files[0];
    if (f) $('whatif-policy').value = await f.text();
  }

  // ---------------------------------------------------------------------------
  // Wiring
  // ---------------------------------------------------------------------------

  function init() {
    $('login-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const t = $('token').value.trim();
      if (!t) return;
      sessionStorage.setItem(TOKEN_KEY, t);
      $('token').value = '';
      try {
        await api('/api/policy');
        $('login-error').hidden = true;
        if (!location.hash || location.hash === '#/') location.hash = '#/dashboard';
        else await route();
      } catch (e) {
        if (e.status === 429) signOut('Too many failed attempts from this address; wait a minute.');
        else if (e.status !== 401) signOut(e.message);
      }
    });
    $('logout').addEventListener('click', () => {
      signOut();
      location.hash = '';
    });
    $('filters').addEventListener('submit', (ev) => {
      ev.preventDefault();
      loadQuarantine().catch((e) => e.status !== 401 && notice(e.message, true));
    });
    $('hours').addEventListener('change', () => loadDashboard().catch((e) => e.status !== 401 && notice(e.message, true)));
    $('release').addEventListener('click', release);
    $('download').addEventListener('click', download);
    $('delete').addEventListener('click', () => {
      $('delete').hidden = true;
      $('delete-confirm').hidden = false;
      $('delete-cancel').hidden = false;
    });
    $('delete-cancel').addEventListener('click', resetDelete);
    $('delete-confirm').addEventListener('click', doDelete);
    $('whatif-form').addEventListener('submit', runWhatIf);
    $('whatif-file').addEventListener('change', () => loadWhatIfFile().catch((e) => notice(e.message, true)));
    window.addEventListener('hashchange', route);
    route();
  }

  init();
})();
