// modelherd's status page: every model, live. No build step, no dependencies.
//
// The key (when the daemon wants one) is asked once and kept in localStorage; every call sends
// it as a header. The event feed is read with fetch() streaming, since EventSource cannot send
// headers and a key in the URL would land in logs and history. Text only ever goes in through
// textContent: a model's name is data, never markup.
'use strict';

const KEY_STORE = 'modelherd.apiKey';
const REFRESH_MS = 5000; // slots, queue and memory change without events
const $ = (id) => document.getElementById(id);

const state = {
  key: localStorage.getItem(KEY_STORE) || '',
  admin: false,
  models: new Map(), // id -> the model as GET /models shows it
  live: new Map(), // id -> what the feed said last: {status, stage, value, download, message}
  feed: null, // AbortController of the feed being read
  timer: null,
  pending: null, // a refresh asked for and not yet run
  listed: false, // GET /models answered at least once
};

class AuthError extends Error {}

function headers(extra) {
  const h = Object.assign({}, extra);
  if (state.key) h.Authorization = 'Bearer ' + state.key;
  return h;
}

async function call(method, path, body) {
  const init = {method, cache: 'no-store', headers: headers(body ? {'Content-Type': 'application/json'} : {})};
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  if (r.status === 401) throw new AuthError(await message(r));
  if (!r.ok) throw new Error(await message(r));
  return r.json();
}

async function message(r) {
  try {
    const body = await r.json();
    return (body.error && body.error.message) || r.statusText;
  } catch (e) {
    return `${r.status} ${r.statusText}`;
  }
}

// ---- the key ------------------------------------------------------------------------------

function askKey(why) {
  stop();
  $('keyform').hidden = false;
  $('models').hidden = true;
  $('empty').hidden = true;
  $('forget').hidden = true;
  $('who').textContent = '';
  $('keyerror').hidden = !why;
  $('keyerror').textContent = why || '';
  $('key').focus();
}

$('keyform').addEventListener('submit', (ev) => {
  ev.preventDefault();
  state.key = $('key').value.trim();
  $('key').value = '';
  start(true);
});

$('forget').addEventListener('click', () => {
  localStorage.removeItem(KEY_STORE);
  state.key = '';
  askKey('');
});

// ---- start, stop ----------------------------------------------------------------------------

async function start(fresh) {
  let who;
  try {
    who = await call('GET', '/whoami');
  } catch (e) {
    if (e instanceof AuthError) {
      if (state.key && fresh) localStorage.removeItem(KEY_STORE);
      askKey(state.key ? 'The daemon refused this key.' : '');
      return;
    }
    notice(`Cannot reach the daemon: ${e.message}. Retrying…`);
    setTimeout(() => start(false), 3000);
    return;
  }
  if (state.key) localStorage.setItem(KEY_STORE, state.key);
  state.admin = who.role === 'admin';
  $('keyform').hidden = true;
  $('forget').hidden = !who.keys_required;
  $('who').textContent = who.keys_required ? `key “${who.key}” (${who.role})` : '';
  notice('');
  await refresh();
  follow();
  state.timer = setInterval(refresh, REFRESH_MS);
}

function stop() {
  if (state.feed) state.feed.abort();
  state.feed = null;
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  state.models.clear();
  state.live.clear();
  state.listed = false;
  render();
}

function notice(text) {
  $('notice').textContent = text;
  $('notice').hidden = !text;
}

// ---- data -------------------------------------------------------------------------------------

async function refresh() {
  state.pending = null;
  try {
    const list = await call('GET', '/models');
    state.models = new Map(list.data.map((m) => [m.id, m]));
    state.listed = true;
    render();
  } catch (e) {
    if (e instanceof AuthError) askKey('The daemon refused this key.');
  }
}

function refreshSoon() {
  if (!state.pending) state.pending = setTimeout(refresh, 150);
}

async function follow() {
  const ctrl = new AbortController();
  state.feed = ctrl;
  let delay = 500;
  while (!ctrl.signal.aborted) {
    try {
      const r = await fetch('/models/sse', {headers: headers({Accept: 'text/event-stream'}),
                                            cache: 'no-store', signal: ctrl.signal});
      if (r.status === 401) {
        askKey('The daemon refused this key.');
        return;
      }
      if (!r.ok) throw new Error(await message(r));
      live(true);
      delay = 500;
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += value;
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          for (const line of block.split('\n')) {
            if (line.startsWith('data: ')) onEvent(JSON.parse(line.slice(6)));
          }
        }
        render();
      }
    } catch (e) {
      if (ctrl.signal.aborted) return;
    }
    live(false);
    await new Promise((ok) => setTimeout(ok, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

function live(on) {
  $('conn').dataset.live = String(on);
  $('conn').textContent = on ? 'live' : 'disconnected, retrying…';
  if (on) refreshSoon(); // what changed while the feed was down
}

function onEvent(ev) {
  const d = ev.data || {};
  if (ev.event === 'snapshot') {
    state.live.clear();
    for (const m of d.models || []) state.live.set(m.id, fromState(m, {}));
    refreshSoon();
    return;
  }
  if (!ev.model) {
    refreshSoon(); // e.g. models_reload
    return;
  }
  const was = state.live.get(ev.model) || {};
  if (ev.event === 'status_change') {
    state.live.set(ev.model, fromState(d, was));
    if (d.value === undefined) refreshSoon(); // a new state, not one more step of a load
  } else if (ev.event === 'download_progress') {
    state.live.set(ev.model, Object.assign({}, was, {download: d, message: ''}));
  } else if (ev.event === 'download_finished') {
    if (!d.file) state.live.set(ev.model, Object.assign({}, was, {download: null}));
    refreshSoon();
  } else if (ev.event === 'download_failed') {
    state.live.set(ev.model, Object.assign({}, was, {download: null, message: d.message || ''}));
    refreshSoon();
  } else {
    refreshSoon(); // model_remove and anything newer
  }
}

function fromState(d, was) {
  const out = {status: d.status, stage: d.stage || '', value: d.value, message: d.message || '',
               download: null};
  if (d.file !== undefined) out.download = {file: d.file, downloaded: d.downloaded, total: d.total};
  else if (d.status === 'downloading' && was.download) out.download = was.download;
  return out;
}

// ---- the table --------------------------------------------------------------------------------

function render() {
  const ids = [...state.models.keys()];
  for (const id of state.live.keys()) if (!state.models.has(id)) ids.push(id);
  const body = document.querySelector('#models tbody');
  const keep = new Set(ids);
  for (const tr of [...body.rows]) if (!keep.has(tr.dataset.model)) tr.remove();
  for (const id of ids) body.appendChild(rowFor(body, id)); // in order, rows moved not rebuilt
  const shown = $('keyform').hidden;
  $('models').hidden = !shown || ids.length === 0;
  $('empty').hidden = !shown || ids.length !== 0 || !state.listed;
}

function rowFor(body, id) {
  let tr = [...body.rows].find((r) => r.dataset.model === id);
  if (!tr) {
    tr = document.createElement('tr');
    tr.dataset.model = id;
    for (const cls of ['model', 'backend', 'status', 'progress', 'num memory', 'num slots', 'num queue',
                       'actions']) {
      const td = document.createElement('td');
      td.className = cls;
      tr.appendChild(td);
    }
  }
  fill(tr, id, state.models.get(id), state.live.get(id));
  return tr;
}

function fill(tr, id, m, l) {
  const [name, backend, status, progress, memory, slots, queue, actions] = tr.cells;
  const value = l ? l.status : m.status.value;
  tr.dataset.status = value;

  name.replaceChildren(id);
  if (m && m.aliases.length) name.appendChild(small(m.aliases.join(', ')));
  backend.textContent = m ? (m.device ? `${m.backend} · ${m.device}` : m.backend) : '';

  const badge = document.createElement('span');
  badge.className = `state state-${value}`;
  badge.textContent = value;
  status.replaceChildren(badge);
  const why = (l && l.message) || (m && m.status.message) || '';
  if (value === 'failed' && why) status.appendChild(small(why));
  else if (m && m.status.queued && value === 'unloaded') status.appendChild(small(m.status.queued));

  showProgress(progress, value, m, l);
  memory.textContent = m ? memoryText(m, value) : '';
  slots.textContent = m && m.slots ? `${m.slots.busy}/${m.slots.total}` : '–';
  queue.textContent = m ? `${m.in_flight - m.waiting} running · ${m.waiting} waiting` : '';
  showActions(actions, id, value);
}

function small(text) {
  const el = document.createElement('small');
  el.textContent = text;
  return el;
}

function showProgress(td, value, m, l) {
  let fraction = null;
  let text = '';
  const download = (l && l.download) || (m && m.status.download) || null;
  if (download && (value === 'downloading' || value === 'unloaded' || value === 'failed')) {
    fraction = download.total ? download.downloaded / download.total : null;
    text = `${download.file} ${mib(download.downloaded)}` + (download.total ? ` / ${mib(download.total)}` : '');
    if (value !== 'downloading') text = 'pulling ' + text;
  } else if (value === 'loading') {
    const v = l && l.value !== undefined ? l.value : m ? m.status.progress : undefined;
    const stage = (l && l.stage) || (m && m.status.stage) || 'load';
    fraction = v === undefined ? null : v;
    text = fraction === null ? 'starting' : `${stage} ${Math.round(fraction * 100)}%`;
  }
  if (!text) {
    td.replaceChildren();
    return;
  }
  let bar = td.querySelector('progress');
  if (!bar) {
    bar = document.createElement('progress');
    bar.max = 1;
  }
  if (fraction === null) bar.removeAttribute('value');
  else bar.value = fraction;
  const label = document.createElement('span');
  label.textContent = text;
  td.replaceChildren(bar, label);
}

function showActions(td, id, value) {
  if (!state.admin) {
    td.replaceChildren();
    return;
  }
  const want = value === 'unloaded' || value === 'failed' ? 'Load'
    : value === 'loaded' || value === 'loading' || value === 'downloading' ? 'Unload' : null;
  const have = td.querySelector('button');
  if (have && have.textContent === want) return;
  if (!want) {
    td.replaceChildren();
    return;
  }
  const button = document.createElement('button');
  button.type = 'button';
  button.textContent = want;
  button.addEventListener('click', async () => {
    button.disabled = true;
    try {
      await call('POST', want === 'Load' ? '/models/load' : '/models/unload', {model: id});
      notice('');
    } catch (e) {
      if (e instanceof AuthError) askKey('The daemon refused this key.');
      else notice(`${want} ${id}: ${e.message}`);
    } finally {
      button.disabled = false;
      refreshSoon();
    }
  });
  td.replaceChildren(button);
}

function memoryText(m, value) {
  if (m.memory.rss) return bytes(m.memory.rss);
  if (m.memory.estimate && value !== 'loaded') return '≈ ' + bytes(m.memory.estimate);
  return '–';
}

function bytes(n) {
  return n >= 1024 ** 3 ? `${(n / 1024 ** 3).toFixed(1)} GiB` : `${Math.round(n / 1024 ** 2)} MiB`;
}

function mib(n) {
  return `${(n / 1024 ** 2).toFixed(1)} MiB`;
}

start(false);
