// The page's entry: log in, then the upload form, the task list and the live stream.

import * as api from './api.js';
import { apiErrorText, applyStatic, getLang, onLangChange, sayNotice, setLang, t } from './i18n.js';
import { startStream } from './stream.js';
import { isFinal, TaskList } from './tasks.js';
import { UploadForm } from './upload.js';

const $ = (selector) => document.querySelector(selector);
const PAGE_SIZE = 20;
const TOAST_MS = 6000;

const state = {
  user: null,
  credits: null,
  stream: null,
  nextCursor: null,
  connection: 'connecting',
  loginError: null,
  held: null, // stream events received while the list loads
  filter: 'all',
  clearTimer: null, // a pending "clear finished" confirmation
};

// Login and logout in one tab are mirrored in the others.
const session = 'BroadcastChannel' in window ? new BroadcastChannel('zhiyi-session') : null;

const list = new TaskList($('#task-list'), { onChanged: taskChanged });
const upload = new UploadForm($('#upload-form'), {
  onCreated(task) {
    list.merge([task]);
    showEmpty();
    refreshCredits();
  },
  onFirstSubmit: askNotificationPermission,
  balance: () => state.credits,
});

function errorText(error) {
  return apiErrorText(error);
}

// ------------------------------------------------------------------ login
function showLogin(message = null) {
  state.loginError = message;
  $('#app').hidden = true;
  $('#logout').hidden = true;
  $('#account').hidden = true;
  $('#connection').hidden = true;
  $('#login').hidden = false;
  renderLoginError();
  $('#token').focus();
}

function renderLoginError() {
  $('#login-error').textContent = state.loginError ? t(state.loginError) : '';
}

async function submitLogin(event) {
  event.preventDefault();
  const token = $('#token').value.trim();
  if (!token) {
    $('#login-error').textContent = t('login.required');
    return;
  }
  try {
    await api.login(token);
  } catch (error) {
    state.loginError = null;
    // The server's own sentence ("That token is not valid."), unless it was unreachable.
    $('#login-error').textContent = error.status ? error.message : errorText(error);
    return;
  }
  $('#token').value = '';
  session?.postMessage('login');
  await start();
}

async function logout() {
  try {
    await api.logout();
  } catch (error) {
    toast(errorText(error), 'error');
    return;
  }
  session?.postMessage('logout');
  leave();
}

// ------------------------------------------------------------ the app
/** Ask who we are; show the app, or the login box on 401. */
async function start() {
  let who;
  try {
    who = await api.me();
  } catch (error) {
    if (error.status === 401) showLogin(state.loginError);
    else showFatal(errorText(error));
    return;
  }
  state.user = who.userId;
  setCredits(who.credits);
  $('#login').hidden = true;
  $('#app').hidden = false;
  $('#logout').hidden = false;
  $('#account').hidden = false;
  $('#connection').hidden = false;
  $('#user').textContent = t('user', { user: state.user });
  // The stream first, then the list: events of the gap are held, not lost.
  state.stream?.stop();
  state.stream = startStream({ onEvent, onState: setConnection, onClosed: checkSession });
  await Promise.all([loadTypes(), reloadTasks()]);
}

/** Stop everything and show the login box (logged out here or in another tab). */
function leave(message = null) {
  state.stream?.stop();
  state.stream = null;
  state.user = null;
  list.clear();
  showLogin(message);
}

function showFatal(message) {
  $('#fatal').textContent = message;
  $('#fatal').hidden = false;
}

async function loadTypes() {
  try {
    const { taskTypes, maxUploadMb, maxAttempts } = await api.taskTypes();
    list.maxAttempts = maxAttempts;
    upload.maxUploadMb = maxUploadMb;
    upload.load(taskTypes);
  } catch (error) {
    showFatal(errorText(error));
  }
}

/** The first page afresh; stream events that arrive meanwhile wait, then apply if newer. */
async function reloadTasks() {
  state.held = state.held ?? [];
  list.clear();
  state.nextCursor = null;
  await loadMore();
  const held = state.held;
  state.held = null;
  for (const event of held) handleEvent(event, true);
}

async function loadMore() {
  const button = $('#load-more');
  button.disabled = true;
  $('#tasks-error').textContent = '';
  try {
    const page = await api.listTasks({ cursor: state.nextCursor, limit: PAGE_SIZE });
    list.merge(page.tasks);
    state.nextCursor = page.nextCursor;
  } catch (error) {
    $('#tasks-error').textContent = errorText(error);
  } finally {
    button.disabled = false;
    button.hidden = state.nextCursor === null;
    showEmpty();
  }
}

function showEmpty() {
  $('#tasks-empty').hidden = list.size > 0;
  $('#tasks-none-shown').hidden = list.size === 0 || list.visible > 0;
  $('#clear-finished').hidden = list.finishedIds().length === 0;
}

// ------------------------------------------------------ filter, search, clear
function setFilter(kind) {
  state.filter = kind;
  for (const button of document.querySelectorAll('#task-filter [data-filter]')) {
    button.setAttribute('aria-pressed', String(button.dataset.filter === kind));
  }
  list.setFilter(kind, $('#task-search').value);
  showEmpty();
}

// Two presses, like a row's Delete: the first says how many will go.
async function clearFinished() {
  const button = $('#clear-finished');
  const count = list.finishedIds().length;
  if (!state.clearTimer) {
    button.textContent = t('tasks.confirmClear', { n: count });
    button.classList.add('danger', 'confirming');
    state.clearTimer = setTimeout(resetClear, 4000);
    return;
  }
  resetClear();
  button.disabled = true;
  const failed = await list.clearFinished();
  button.disabled = false;
  if (failed) toast(t('tasks.clearFailed', { n: failed }), 'error');
  showEmpty();
}

function resetClear() {
  clearTimeout(state.clearTimer);
  state.clearTimer = null;
  const button = $('#clear-finished');
  button.textContent = t('tasks.clearFinished');
  button.classList.remove('danger', 'confirming');
}

// On a phone the list comes first; the form opens with the "New task" button.
function toggleForm() {
  const open = !formOpen();
  $('#new-task').setAttribute('aria-expanded', String(open));
  $('#upload-card').classList.toggle('open', open);
  labelFormButton();
  if (open) $('#upload-title').scrollIntoView({ block: 'nearest' });
}

const formOpen = () => $('#new-task').getAttribute('aria-expanded') === 'true';
const labelFormButton = () => {
  $('#new-task').textContent = t(formOpen() ? 'upload.close' : 'upload.open');
};

// ------------------------------------------------------------ credits
function setCredits(credits) {
  state.credits = credits;
  $('#credits').textContent = t('credits', { n: credits });
  $('#credits').dataset.credits = String(credits);
  upload.renderQuotes(); // "balance after" and whether Start is allowed follow the balance
}

let creditsTimer = null;
/** Re-read the balance soon; several triggers in a row make one request. */
function refreshCredits() {
  clearTimeout(creditsTimer);
  creditsTimer = setTimeout(async () => {
    try {
      setCredits((await api.me()).credits);
    } catch (error) {
      if (error.status === 401) checkSession();
    }
  }, 150);
}

// ------------------------------------------------------------- stream
function onEvent(event) {
  if (state.held) state.held.push(event);
  else handleEvent(event, false);
}

function handleEvent({ type, data }, guard) {
  if (type === 'status_update') {
    list.applyStatus(data, { guard });
    showEmpty();
  } else if (type === 'task_deleted') {
    list.remove(data.taskId);
    showEmpty();
  } else if (type === 'notification') {
    toast(data, data.level);
    if (typeof data.credits === 'number') setCredits(data.credits);
  } else if (type === 'reset') {
    // The server no longer has the events we missed: take a fresh snapshot.
    reloadTasks();
    refreshCredits();
  }
}

function setConnection(next) {
  const wasDown = state.connection === 'reconnecting';
  state.connection = next;
  const indicator = $('#connection');
  indicator.dataset.state = next;
  $('#connection-text').textContent = t(`conn.${next}`);
  if (wasDown && next === 'live') refreshCredits();
}

/** The stream was refused for good: find out whether the session ended. */
async function checkSession() {
  try {
    await api.me();
  } catch (error) {
    if (error.status === 401) leave('error.unauthenticated');
  }
}

function taskChanged(kind, task) {
  showEmpty();
  if (kind === 'added') return;
  refreshCredits();
  if (kind === 'final' && task && isFinal(task.taskStatus)) notifyDesktop(task);
}

// ------------------------------------------------------ notifications
function askNotificationPermission() {
  if ('Notification' in window && Notification.permission === 'default') {
    Notification.requestPermission().catch(() => {});
  }
}

function notifyDesktop(task) {
  if (!document.hidden || !('Notification' in window) || Notification.permission !== 'granted') return;
  const body = task.taskStatus === 'failed' && task.errorMessage ? `${task.fileName}: ${task.errorMessage}` : task.fileName;
  // The tag makes every tab's notice of one task a single notification.
  new Notification(t(`notify.title.${task.taskStatus}`), { body, tag: `zhiyi-task-${task.taskId}` });
}

// A toast shows a string, or a notification's data (said again after a language switch).
const toasts = new Map(); // element -> notification data
function toast(message, level = 'info') {
  const item = document.createElement('div');
  item.className = `toast toast-${level}`;
  item.setAttribute('role', level === 'error' ? 'alert' : 'status');
  if (typeof message === 'string') item.textContent = message;
  else {
    toasts.set(item, message);
    item.textContent = sayNotice(message);
  }
  $('#toasts').append(item);
  setTimeout(() => {
    item.remove();
    toasts.delete(item);
  }, TOAST_MS);
}

// --------------------------------------------------------------- boot
function relabel() {
  // The accessible name starts with the visible text (speech input says what it sees).
  $('#lang-switch').textContent = t('lang.switch');
  $('#lang-switch').lang = getLang() === 'zh' ? 'en' : 'zh';
  $('#lang-switch').setAttribute('aria-label', `${t('lang.switch')} – ${t('lang.switchLabel')}`);
  for (const [item, data] of toasts) item.textContent = sayNotice(data);
  if (state.clearTimer) resetClear();
  labelFormButton();
  if (state.user) $('#user').textContent = t('user', { user: state.user });
  if (state.credits !== null) setCredits(state.credits);
  setConnection(state.connection);
  renderLoginError();
  upload.load(upload.types);
  list.renderAll();
}

function boot() {
  applyStatic(document);
  relabel();
  onLangChange(relabel);
  $('#lang-switch').addEventListener('click', () => setLang(getLang() === 'zh' ? 'en' : 'zh'));
  $('#logout').addEventListener('click', logout);
  $('#login-form').addEventListener('submit', submitLogin);
  $('#load-more').addEventListener('click', loadMore);
  $('#new-task').addEventListener('click', toggleForm);
  $('#clear-finished').addEventListener('click', clearFinished);
  $('#task-search').addEventListener('input', () => setFilter(state.filter));
  for (const button of document.querySelectorAll('#task-filter [data-filter]')) {
    button.addEventListener('click', () => setFilter(button.dataset.filter));
  }
  if (session) {
    session.onmessage = ({ data }) => {
      if (data === 'logout') leave('error.unauthenticated');
      else if (data === 'login' && !state.user) start();
    };
  }
  if (location.hash === '#login-failed') {
    state.loginError = 'login.failed';
    history.replaceState(null, '', location.pathname + location.search);
  }
  start();
}

boot();
