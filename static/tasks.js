// The task list: one row per task, newest first, updated in place from stream events.

import * as api from './api.js';
import { apiErrorText, formatTime, getLang, has, say, t } from './i18n.js';

const FINAL = new Set(['completed', 'failed', 'cancelled']);
const GROUPS = { pending: 'active', processing: 'active', completed: 'finished', cancelled: 'finished', failed: 'failed' };

/** The filter group of a status: active, finished (completed or cancelled) or failed. */
export const groupOf = (status) => GROUPS[status] ?? 'active';

// Waiting between automatic retries: still pending, but not "Pending" to a person.
const isRetrying = (task) => task.taskStatus === 'pending' && (task.messageCode === 'retrying' || (task.attempts ?? 0) > 0 && task.stage === 'waiting');

let names = null;
/** A language's name in the page's language ("zh" -> "Chinese" or "中文"). */
export function langName(code) {
  if (!code || code === 'auto') return code === 'auto' ? t('lang.auto') : '';
  try {
    if (!names || names.lang !== getLang()) {
      names = { lang: getLang(), display: new Intl.DisplayNames([getLang() === 'zh' ? 'zh-CN' : 'en'], { type: 'language' }) };
    }
    return names.display.of(code) ?? code;
  } catch {
    return code; // not a language tag Intl knows
  }
}
const RANK = { pending: 0, processing: 1, completed: 2, failed: 2, cancelled: 2 };
const CONFIRM_MS = 4000;

/** Whether a status is final (the task will not change again by itself). */
export const isFinal = (status) => FINAL.has(status);

// A status_update's data, in the shape of the Task object's fields.
function fromStatusUpdate(data) {
  const fields = {
    taskStatus: data.status,
    progressPercent: data.progress ?? 0,
    statusMessage: data.message ?? '',
    stage: data.stage ?? null,
    stageCode: data.stageCode ?? data.stage ?? null,
    messageCode: data.messageCode ?? null,
    messageParams: data.messageParams ?? {},
    etaSeconds: data.etaSeconds ?? null,
  };
  // The end time is the event's: a finished row shows it without a reload.
  if (FINAL.has(data.status)) fields.completedAt = data.completedAt ?? new Date().toISOString();
  else fields.completedAt = null;
  if ('attempts' in data) fields.attempts = data.attempts;
  if (data.status === 'completed') fields.resultUrl = data.resultUrl ?? null;
  if (data.status === 'failed') {
    fields.errorMessage = data.error ?? data.message ?? null;
    fields.errorCode = data.errorCode ?? null;
    fields.errorMessageCode = data.errorMessageCode ?? null;
    fields.errorParams = data.errorParams ?? {};
  }
  if (!isFinal(data.status)) {
    fields.errorMessage = null;
    fields.errorCode = null;
    fields.errorMessageCode = null;
    fields.errorParams = {};
    fields.resultUrl = null;
  }
  return fields;
}

// Whether `next` would move the task backwards from `current` (an older snapshot
// arriving after a newer event). Retries restart attempts, so only compare within one.
function isOlder(next, current) {
  if ((next.attempts ?? 0) !== (current.attempts ?? 0)) {
    return (next.attempts ?? 0) < (current.attempts ?? 0) && !isFinal(next.taskStatus);
  }
  const a = RANK[next.taskStatus] ?? 0;
  const b = RANK[current.taskStatus] ?? 0;
  if (a !== b) return a < b;
  return a === 1 && (next.progressPercent ?? 0) < (current.progressPercent ?? 0);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === 'class') node.className = value;
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? '' : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

/**
 * The list. `onChanged(kind, task)` is told about 'final' transitions (desktop
 * notice, credits) and about actions that move credits ('action').
 */
export class TaskList {
  constructor(container, { onChanged = () => {} } = {}) {
    this.container = container;
    this.onChanged = onChanged;
    this.tasks = new Map(); // taskId -> task object
    this.rows = new Map(); // taskId -> <li>
    this.fetching = new Map(); // taskId -> status updates that arrived while fetching it
    this.errors = new Map(); // taskId -> the ApiError of an action, shown in the row
    this.confirming = new Map(); // taskId -> timer of a pending delete confirmation
  }

  /** Forget everything (log out, or a stream `reset`). */
  clear() {
    for (const timer of this.confirming.values()) clearTimeout(timer);
    this.confirming.clear();
    this.tasks.clear();
    this.rows.clear();
    this.errors.clear();
    this.container.replaceChildren();
  }

  /** Add or update tasks from REST answers, without going back in time. */
  merge(tasks) {
    for (const task of tasks) {
      const current = this.tasks.get(task.taskId);
      if (current && isOlder(task, current)) continue;
      this.put(task);
    }
  }

  /** Apply a task that an action (cancel, retry) just returned: it is the newest state. */
  put(task) {
    this.tasks.set(task.taskId, task);
    this.render(task.taskId);
  }

  /**
   * A `status_update` from the stream; unknown tasks are fetched and added.
   * With `guard`, an update older than what the list shows is ignored (events
   * that were held while the list loaded).
   */
  applyStatus(data, { guard = false } = {}) {
    const id = data.taskId;
    if (this.fetching.has(id)) {
      this.fetching.get(id).push(data);
      return;
    }
    const current = this.tasks.get(id);
    if (!current) {
      this.fetchUnknown(id, data);
      return;
    }
    const wasFinal = isFinal(current.taskStatus);
    const next = { ...current, ...fromStatusUpdate(data) };
    if (guard && isOlder(next, current)) return;
    this.tasks.set(id, next);
    this.render(id);
    if (!wasFinal && isFinal(next.taskStatus)) this.onChanged('final', next);
  }

  async fetchUnknown(id, data) {
    this.fetching.set(id, [data]);
    try {
      const { task } = await api.getTask(id);
      this.merge([task]);
      const later = this.fetching.get(id);
      this.fetching.delete(id);
      // Updates that crossed the fetch may be older than its answer.
      for (const update of later) this.applyStatus(update, { guard: true });
      this.onChanged('added', this.tasks.get(id) ?? null);
    } catch (error) {
      this.fetching.delete(id);
      if (error.status !== 404) console.warn('zhiyi: could not fetch task', id, error);
    }
  }

  /** A `task_deleted` event, or a delete done here. */
  remove(id) {
    this.tasks.delete(id);
    this.errors.delete(id);
    this.rows.get(id)?.remove();
    this.rows.delete(id);
  }

  /** Re-draw every row (after a language switch, or every minute for relative data). */
  renderAll() {
    for (const id of this.tasks.keys()) this.render(id);
  }

  get size() {
    return this.tasks.size;
  }

  /** Show only the rows of `kind` (all | active | finished | failed) whose file name has `query`. */
  setFilter(kind, query = '') {
    this.filter = { kind, query: query.trim().toLocaleLowerCase() };
    for (const id of this.tasks.keys()) this.applyFilter(id);
  }

  /** Whether a task shows under the current filter. */
  matches(task) {
    const { kind, query } = this.filter ?? { kind: 'all', query: '' };
    if (query && !task.fileName.toLocaleLowerCase().includes(query)) return false;
    return kind === 'all' || groupOf(task.taskStatus) === kind;
  }

  applyFilter(id) {
    const row = this.rows.get(id);
    if (row) row.hidden = !this.matches(this.tasks.get(id));
  }

  /** How many rows the filter shows. */
  get visible() {
    let n = 0;
    for (const task of this.tasks.values()) if (this.matches(task)) n += 1;
    return n;
  }

  /** The ids of completed and cancelled tasks ("clear finished" deletes them). */
  finishedIds() {
    return [...this.tasks.values()].filter((task) => groupOf(task.taskStatus) === 'finished').map((task) => task.taskId);
  }

  /** Delete every finished task; returns how many could not be deleted. */
  async clearFinished() {
    let failed = 0;
    for (const id of this.finishedIds()) {
      try {
        await api.deleteTask(id);
        this.remove(id);
      } catch (error) {
        if (error.status === 404) this.remove(id);
        else failed += 1;
      }
    }
    this.onChanged('action', null);
    return failed;
  }

  /**
   * Draw a task into its row. The row and its controls are made once and then
   * updated field by field: a button under the pointer is never replaced while
   * progress events arrive, so a click on it is not lost.
   */
  render(id) {
    const task = this.tasks.get(id);
    let row = this.rows.get(id);
    if (!row) {
      row = this.buildRow(id);
      this.rows.set(id, row);
      this.insertSorted(id, row);
    }
    this.fill(row, task);
    this.applyFilter(id);
  }

  insertSorted(id, row) {
    // Newest first: task ids increase with creation.
    for (const child of this.container.children) {
      if (Number(child.dataset.taskId) < id) {
        child.before(row);
        return;
      }
    }
    this.container.append(row);
  }

  // The row's skeleton; `fill` puts the task's state into it.
  buildRow(id) {
    const part = (tag, role, attrs = {}) => el(tag, { ...attrs, 'data-role': role });
    const details = el('details', { class: 'task-error-details', 'data-role': 'error-details' },
      el('summary', { 'data-role': 'details-label' }), part('pre', 'raw-error'));
    return el(
      'li',
      { class: 'task', 'data-task-id': id, 'aria-labelledby': `task-${id}-name` },
      el('div', { class: 'task-head' },
        el('span', { class: 'task-name', id: `task-${id}-name`, 'data-role': 'name' }),
        part('span', 'kind', { class: 'task-kind' }),
        part('span', 'status', { class: 'badge' })),
      el('div', { class: 'task-progress', 'data-role': 'progress-box' },
        part('progress', 'progress', { max: '100' }),
        part('span', 'percent', { class: 'percent' })),
      part('p', 'message', { class: 'task-detail' }),
      el('div', { class: 'task-error', 'data-role': 'error-box' }, part('p', 'task-error'), details),
      part('p', 'expired', { class: 'task-detail' }),
      part('p', 'meta', { class: 'task-meta' }),
      part('p', 'row-error', { class: 'row-error', role: 'alert' }),
      el('div', { class: 'task-actions', role: 'group', 'data-role': 'actions' }),
    );
  }

  fill(row, task) {
    const id = task.taskId;
    const status = task.taskStatus;
    const percent = Math.round(task.progressPercent ?? 0);
    const name = task.fileName;
    const get = (role) => row.querySelector(`[data-role="${role}"]`);
    const setText = (role, text) => {
      const node = get(role);
      if (node.textContent !== text) node.textContent = text;
      node.hidden = !text;
    };
    const retrying = isRetrying(task);
    row.className = `task status-${status}${isFinal(status) ? ' compact' : ''}`;
    row.dataset.status = status;
    get('name').textContent = name;
    const typeLabel = has(`type.${task.taskType}`) ? t(`type.${task.taskType}`) : task.taskType;
    // With "detect automatically", the language found: "English → French".
    const detected = task.params?.sourceLang === 'auto' && task.detectedLang && task.detectedLang !== 'unknown'
      ? langName(task.detectedLang) : '';
    const targetName = task.params?.targetLang ? langName(task.params.targetLang) : '';
    const target = !targetName ? '' : detected ? ` · ${detected} → ${targetName}` : ` → ${targetName}`;
    const engine = task.params?.engine ? ` · ${task.params.engine}` : '';
    setText('kind', `#${task.userTaskNo ?? id} · ${typeLabel}${target}${engine}`);
    const badge = get('status');
    badge.className = `badge badge-${retrying ? 'processing' : status}`;
    badge.textContent = retrying ? t('status.retrying') : t(`status.${status}`);

    get('progress-box').hidden = isFinal(status);
    const bar = get('progress');
    bar.value = percent;
    bar.setAttribute('aria-label', t('task.progressLabel', { name }));
    setText('percent', `${percent} %`);

    // The stage is what a running task is doing; once it ended, it is stale.
    const stageCode = task.stageCode ?? task.stage;
    const stage = stageCode && !isFinal(status) && stageCode !== 'waiting'
      ? (has(`stage.${stageCode}`) ? t(`stage.${stageCode}`) : stageCode) : null;
    const message = status === 'failed' ? null : say(task.messageCode, task.messageParams ?? {}, task.statusMessage);
    const detail = [
      stage,
      message || null,
      retrying ? t('task.retrying', { n: (task.attempts ?? 0) + 1, max: this.maxAttempts ?? 3 }) : null,
      status === 'processing' && task.etaSeconds ? t('task.eta', { s: Math.ceil(task.etaSeconds) }) : null,
    ].filter(Boolean);
    setText('message', detail.join(' · '));

    // A failure: a sentence for people, the raw error behind a toggle.
    const failed = status === 'failed' && (task.errorMessage || task.errorCode);
    get('error-box').hidden = !failed;
    if (failed) {
      const people = has(`failure.${task.errorCode}`) ? t(`failure.${task.errorCode}`) : t('failure.unknown');
      const said = task.errorMessageCode && task.errorMessageCode !== 'text'
        ? say(task.errorMessageCode, task.errorParams ?? {}, '') : '';
      get('task-error').textContent = said && said !== people ? `${people} (${said})` : people;
      get('details-label').textContent = t('task.details');
      get('raw-error').textContent = task.errorMessage + (task.errorCode ? ` (${task.errorCode})` : '');
      get('error-details').hidden = !task.errorMessage;
    }
    setText('expired', task.expired && status === 'completed' ? t('task.expired') : '');
    const meta = [
      t('task.cost', { n: task.creditsCost }),
      t('task.created', { time: formatTime(task.createdAt) }),
      task.completedAt ? t('task.completed', { time: formatTime(task.completedAt) }) : null,
      task.attempts > 1 && !retrying ? t('task.attempt', { n: task.attempts }) : null,
    ].filter(Boolean);
    setText('meta', meta.join(' · '));
    const rowError = this.errors.get(id);
    setText('row-error', rowError ? apiErrorText(rowError) : '');
    this.fillActions(get('actions'), task);
  }

  // The buttons change only when the set of actions changes.
  fillActions(box, task) {
    box.setAttribute('aria-label', t('task.actions', { name: task.fileName }));
    const wanted = this.buildActions(task);
    const key = [...wanted.children].map((node) => `${node.dataset.action}:${node.textContent}:${node.className}`).join('|');
    if (box.dataset.key === key) return;
    const focused = box.contains(document.activeElement) ? document.activeElement.dataset.action : null;
    box.dataset.key = key;
    box.replaceChildren(...wanted.children);
    if (focused) (box.querySelector(`[data-action="${focused}"]`) ?? box.querySelector('[data-action]'))?.focus();
  }

  buildActions(task) {
    const id = task.taskId;
    const status = task.taskStatus;
    const actions = el('div', { class: 'task-actions', role: 'group', 'aria-label': t('task.actions', { name: task.fileName }) });
    if (status === 'completed' && !task.expired && task.resultUrl !== null) {
      actions.append(
        el('a', { class: 'button primary', href: api.resultHref(id), download: task.resultName || '', 'data-action': 'download' }, t('task.download')),
      );
    }
    if (!isFinal(status)) {
      actions.append(el('button', { type: 'button', 'data-action': 'cancel', onclick: () => this.act(id, 'cancel') }, t('task.cancel')));
    }
    if (status === 'failed' || status === 'cancelled') {
      actions.append(el('button', { type: 'button', 'data-action': 'retry', onclick: () => this.act(id, 'retry') }, t('task.retry')));
    }
    const confirming = this.confirming.has(id);
    actions.append(
      el(
        'button',
        { type: 'button', class: confirming ? 'danger confirming' : 'danger', 'data-action': 'delete', onclick: () => this.askDelete(id) },
        confirming ? t('task.confirmDelete') : t('task.delete'),
      ),
    );
    return actions;
  }

  // Deleting needs a second press within a few seconds (no blocking dialog).
  askDelete(id) {
    if (!this.confirming.has(id)) {
      this.confirming.set(
        id,
        setTimeout(() => {
          this.confirming.delete(id);
          if (this.tasks.has(id)) this.render(id);
        }, CONFIRM_MS),
      );
      this.render(id);
      return;
    }
    clearTimeout(this.confirming.get(id));
    this.confirming.delete(id);
    this.act(id, 'delete');
  }

  async act(id, action) {
    this.errors.delete(id);
    try {
      if (action === 'delete') {
        await api.deleteTask(id);
        this.remove(id);
      } else {
        const { task } = await (action === 'cancel' ? api.cancelTask(id) : api.retryTask(id));
        this.put(task);
      }
      this.onChanged('action', this.tasks.get(id) ?? null);
    } catch (error) {
      this.errors.set(id, error); // said at each render: it follows a language switch
      if (this.tasks.has(id)) this.render(id);
    }
  }
}
