// The task list: one row per task, newest first, updated in place from stream events.

import * as api from './api.js';
import { formatTime, has, t } from './i18n.js';

const FINAL = new Set(['completed', 'failed', 'cancelled']);
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
    etaSeconds: data.etaSeconds ?? null,
  };
  if ('attempts' in data) fields.attempts = data.attempts;
  if (data.status === 'completed') fields.resultUrl = data.resultUrl ?? null;
  if (data.status === 'failed') {
    fields.errorMessage = data.error ?? data.message ?? null;
    fields.errorCode = data.errorCode ?? null;
  }
  if (!isFinal(data.status)) {
    fields.errorMessage = null;
    fields.errorCode = null;
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
    this.errors = new Map(); // taskId -> message shown in the row
    this.confirming = new Map(); // taskId -> timer of a pending delete confirmation
  }

  /** Forget everything (log out, or a stream `reset`). */
  clear() {
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

  /** Re-draw every row (after a language switch). */
  renderAll() {
    for (const id of this.tasks.keys()) this.render(id);
  }

  get size() {
    return this.tasks.size;
  }

  render(id) {
    const task = this.tasks.get(id);
    const row = this.buildRow(task);
    const old = this.rows.get(id);
    if (old) {
      // Keep keyboard focus on the same control across a re-render.
      const focused = old.contains(document.activeElement) ? document.activeElement.dataset.action : null;
      old.replaceWith(row);
      if (focused) (row.querySelector(`[data-action="${focused}"]`) ?? row.querySelector('[data-action]'))?.focus();
    } else {
      this.insertSorted(id, row);
    }
    this.rows.set(id, row);
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

  buildRow(task) {
    const id = task.taskId;
    const status = task.taskStatus;
    const percent = Math.round(task.progressPercent ?? 0);
    const name = task.fileName;
    const typeLabel = has(`type.${task.taskType}`) ? t(`type.${task.taskType}`) : task.taskType;
    const target = task.params?.targetLang ? ` → ${task.params.targetLang}` : '';
    const engine = task.params?.engine ? ` · ${task.params.engine}` : '';
    // The stage is what a running task is doing; once it ended, it is stale.
    const stage = task.stage && !isFinal(status) ? (has(`stage.${task.stage}`) ? t(`stage.${task.stage}`) : task.stage) : null;
    const error = this.errors.get(id);

    const meta = [
      t('task.cost', { n: task.creditsCost }),
      t('task.created', { time: formatTime(task.createdAt) }),
      task.completedAt ? t('task.completed', { time: formatTime(task.completedAt) }) : null,
      task.attempts > 1 ? t('task.attempt', { n: task.attempts }) : null,
    ].filter(Boolean);

    const detail = [
      stage,
      task.statusMessage || null,
      status === 'processing' && task.etaSeconds ? t('task.eta', { s: Math.ceil(task.etaSeconds) }) : null,
    ].filter(Boolean);

    return el(
      'li',
      { class: `task status-${status}`, 'data-task-id': id, 'data-status': status, 'aria-labelledby': `task-${id}-name` },
      el(
        'div',
        { class: 'task-head' },
        el('span', { class: 'task-name', id: `task-${id}-name` }, name),
        el('span', { class: 'task-kind' }, `#${id} · ${typeLabel}${target}${engine}`),
        el('span', { class: `badge badge-${status}`, 'data-role': 'status' }, t(`status.${status}`)),
      ),
      el(
        'div',
        { class: 'task-progress' },
        el('progress', { max: '100', value: String(percent), 'aria-label': t('task.progressLabel', { name }) }),
        el('span', { class: 'percent', 'data-role': 'percent' }, `${percent} %`),
      ),
      detail.length ? el('p', { class: 'task-detail', 'data-role': 'message' }, detail.join(' · ')) : null,
      status === 'failed' && task.errorMessage
        ? el('p', { class: 'task-error', 'data-role': 'task-error' }, task.errorMessage + (task.errorCode ? ` (${task.errorCode})` : ''))
        : null,
      task.expired && status === 'completed' ? el('p', { class: 'task-detail' }, t('task.expired')) : null,
      el('p', { class: 'task-meta' }, meta.join(' · ')),
      error ? el('p', { class: 'row-error', role: 'alert', 'data-role': 'row-error' }, error) : null,
      this.buildActions(task),
    );
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
      this.errors.set(id, error.code && has(`error.${error.code}`) ? t(`error.${error.code}`) : error.message);
      if (this.tasks.has(id)) this.render(id);
    }
  }
}
