// One notifications stream shared by every tab of the page.
//
// A leader tab, elected with the Web Locks API, holds the only EventSource on
// api/sse/notifications and relays each event over BroadcastChannel('zhiyi-events');
// the other tabs listen. When the leader closes, the browser frees its lock and
// the next tab in line opens the stream from the last event id it saw, so the
// hand-over loses nothing (the server replays from the database).
// Without Web Locks, a small heartbeat election over the BroadcastChannel stands in.

const STREAM_URL = 'api/sse/notifications';
const LOCK_NAME = 'zhiyi-sse';
const CHANNEL_NAME = 'zhiyi-events';
const REOPEN_MIN_MS = 1000;
const REOPEN_MAX_MS = 15000;
const HEARTBEAT_MS = 1000;
const LEADER_SILENCE_MS = 2500;
const FIRST_CLAIM_MS = 500;

/**
 * Start listening. `onEvent({id, type, data})` gets every event once, in order;
 * `onState(state)` gets 'connecting' | 'live' | 'reconnecting';
 * `onClosed()` is called when the server refused the stream for good (the leader
 * then checks whether the session ended). Returns `{stop()}`.
 */
export function startStream({ onEvent, onState, onClosed = () => {} }) {
  const channel = 'BroadcastChannel' in window ? new BroadcastChannel(CHANNEL_NAME) : null;
  let lastId = null;
  let state = 'connecting';
  let source = null;
  let reopenTimer = null;
  let reopenDelay = REOPEN_MIN_MS;
  let leader = false;
  let stopped = false;
  const abort = new AbortController();
  let releaseLock = () => {};
  let fallback = null; // the heartbeat election, when there are no Web Locks

  function setState(next) {
    state = next;
    onState(next);
    if (leader) channel?.postMessage({ kind: 'state', state: next });
  }

  function deliver(id, message) {
    // The snapshot sent on connect reuses the latest id, hence "<" and not "<=".
    if (id !== null && lastId !== null && Number(id) < Number(lastId)) return;
    if (id !== null) lastId = id;
    onEvent({ id, type: message.type, data: message.data });
  }

  function open() {
    clearTimeout(reopenTimer);
    const url = lastId === null ? STREAM_URL : `${STREAM_URL}?lastEventId=${encodeURIComponent(lastId)}`;
    source = new EventSource(url);
    source.onopen = () => {
      reopenDelay = REOPEN_MIN_MS;
      setState('live');
    };
    source.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (error) {
        console.error('zhiyi: unreadable stream event', error);
        return;
      }
      const id = event.lastEventId || null;
      deliver(id, message);
      channel?.postMessage({ kind: 'event', id, message });
    };
    source.onerror = () => {
      setState('reconnecting');
      if (source.readyState !== EventSource.CLOSED) return; // the browser retries by itself
      // Closed for good (a non-200 answer, e.g. 503 while the server stops):
      // reopen later, resuming after the last event seen.
      source = null;
      onClosed();
      reopenTimer = setTimeout(() => !stopped && leader && open(), reopenDelay);
      reopenDelay = Math.min(reopenDelay * 2, REOPEN_MAX_MS);
    };
  }

  function becomeLeader() {
    if (stopped || leader) return;
    leader = true;
    open();
  }

  function resign() {
    leader = false;
    clearTimeout(reopenTimer);
    source?.close();
    source = null;
  }

  if (channel) {
    channel.onmessage = ({ data }) => {
      if (data.kind === 'event' && !leader) deliver(data.id, data.message);
      else if (data.kind === 'state' && !leader) {
        state = data.state;
        onState(state);
      } else if (data.kind === 'hello' && leader) {
        channel.postMessage({ kind: 'state', state });
        fallback?.beat();
      } else if (data.kind === 'heartbeat') fallback?.heard(data.from);
      else if (data.kind === 'resign') fallback?.heard(null);
    };
  }

  if (navigator.locks) {
    // Held until stop() or until the tab goes away (the browser frees it then).
    navigator.locks
      .request(LOCK_NAME, { signal: abort.signal }, () => {
        if (stopped) return undefined; // stopped while waiting: pass the lock on
        becomeLeader();
        return new Promise((resolve) => {
          releaseLock = resolve;
        });
      })
      .catch((error) => {
        if (error.name !== 'AbortError') console.error('zhiyi: lock request failed', error);
      });
  } else if (channel) {
    fallback = heartbeatElection(channel, becomeLeader, resign, () => leader);
  } else {
    becomeLeader();
  }
  onState(state);
  channel?.postMessage({ kind: 'hello' });

  return {
    stop() {
      stopped = true;
      if (leader) channel?.postMessage({ kind: 'resign' });
      resign();
      fallback?.stop();
      abort.abort();
      releaseLock();
      channel?.close();
    },
  };
}

// The leader says so every second; a tab that hears no leader for a while takes
// over; of two leaders, the one with the larger random id steps down.
// A new tab says hello; a leader answers at once, so a lone tab leads after a moment.
function heartbeatElection(channel, becomeLeader, resign, isLeader) {
  const me = Math.random();
  const started = Date.now();
  let lastHeard = 0;
  const beat = () => channel.postMessage({ kind: 'heartbeat', from: me });
  const firstClaim = setTimeout(() => {
    if (lastHeard < started) becomeLeader();
  }, FIRST_CLAIM_MS);
  const timer = setInterval(() => {
    if (isLeader()) beat();
    else if (Date.now() - lastHeard > LEADER_SILENCE_MS && Date.now() - started > FIRST_CLAIM_MS) {
      becomeLeader();
    }
  }, HEARTBEAT_MS);
  window.addEventListener('pagehide', () => {
    if (isLeader()) channel.postMessage({ kind: 'resign' });
  });
  return {
    heard(from) {
      if (from === null) {
        lastHeard = 0;
        return;
      }
      lastHeard = Date.now();
      if (isLeader() && from < me) resign();
    },
    beat,
    stop() {
      clearTimeout(firstClaim);
      clearInterval(timer);
    },
  };
}
