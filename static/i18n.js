// The interface strings in Chinese and English, and the helpers that apply them.
// Server messages (API errors, status messages) are shown as the server wrote them.

const STRINGS = {
  en: {
    'app.title': 'Zhiyi document translation',
    'skip': 'Skip to the content',
    'lang.switch': '中文',
    'lang.switchLabel': 'Switch the interface to Chinese',
    'conn.connecting': 'Connecting…',
    'conn.live': 'Live',
    'conn.reconnecting': 'Reconnecting…',
    'credits': 'Credits: {n}',
    'user': 'Signed in as {user}',
    'logout': 'Log out',
    'login.title': 'Log in',
    'login.help': 'Paste an API token (from “zhiyi user add” or “zhiyi user token”), or open the link that “zhiyi serve” prints.',
    'login.token': 'API token',
    'login.submit': 'Log in',
    'login.failed': 'The token in that link is not valid. Paste a valid token below.',
    'login.required': 'Enter a token.',
    'upload.title': 'New task',
    'upload.drop': 'Drop documents here, or choose files',
    'upload.dropHint': 'Several files at once; each becomes its own task.',
    'upload.accepts': 'Accepted: {list}',
    'upload.selected': 'Selected files',
    'upload.remove': 'Remove {name}',
    'upload.none': 'No file chosen yet.',
    'upload.type': 'Task type',
    'upload.cost': 'Cost: {rule}',
    'upload.submit': 'Start',
    'upload.submitting': 'Uploading {name}…',
    'upload.created': 'Task #{id} created for {name}: {cost} credits.',
    'upload.createdMemory': 'Task #{id} created for {name}: {cost} credits ({n} of {total} segments from your translation memory).',
    'upload.quote': 'Quote',
    'upload.quoting': 'Pricing {name}…',
    'upload.quoted': '{name}: {cost} credits',
    'upload.quotedMemory': '{name}: {cost} credits; {n} of {total} segments from your translation memory are not sent or charged',
    'glossary.none': '(no glossary)',
    'glossary.option': '{name} ({source} → {target}, {terms} terms)',
    'engine.pairs': '{name} ({pairs})',
    'param.glossary': 'Glossary',
    'param.memory': 'Translation memory',
    'upload.chooseFile': 'Choose at least one file.',
    'upload.fileError': '{name}: {message}',
    'engine.unavailable': '{name} (unavailable: {reason})',
    'param.targetLang': 'Target language',
    'param.sourceLang': 'Source language',
    'param.engine': 'Engine',
    'tasks.title': 'Tasks',
    'tasks.empty': 'No tasks yet. Upload a document to start one.',
    'tasks.more': 'Load more',
    'tasks.loading': 'Loading…',
    'task.cancel': 'Cancel',
    'task.retry': 'Retry',
    'task.delete': 'Delete',
    'task.confirmDelete': 'Really delete?',
    'task.download': 'Download',
    'task.expired': 'The result was deleted after the retention period.',
    'task.cost': '{n} credits',
    'task.created': 'Created {time}',
    'task.completed': 'Ended {time}',
    'task.eta': 'about {s} s left',
    'task.attempt': 'attempt {n}',
    'task.progressLabel': 'Progress of {name}',
    'task.actions': 'Actions for {name}',
    'status.pending': 'Pending',
    'status.processing': 'Processing',
    'status.completed': 'Completed',
    'status.failed': 'Failed',
    'status.cancelled': 'Cancelled',
    'stage.parsing': 'reading',
    'stage.translating': 'translating',
    'stage.writing': 'writing',
    'stage.extracting': 'extracting',
    'stage.submitting': 'sending',
    'stage.waiting': 'waiting',
    'type.translate': 'Translate',
    'type.analyze': 'Analyze',
    'type.extract': 'Extract text',
    'notify.title.completed': 'Task completed',
    'notify.title.failed': 'Task failed',
    'notify.title.cancelled': 'Task cancelled',
    'error.network_error': 'The server could not be reached. Check that it is running.',
    'error.unauthenticated': 'You are logged out. Log in again.',
  },
  zh: {
    'app.title': '智译 文档翻译',
    'skip': '跳到主要内容',
    'lang.switch': 'English',
    'lang.switchLabel': '把界面切换为英文',
    'conn.connecting': '正在连接…',
    'conn.live': '实时',
    'conn.reconnecting': '正在重新连接…',
    'credits': '积分：{n}',
    'user': '当前用户：{user}',
    'logout': '退出登录',
    'login.title': '登录',
    'login.help': '粘贴 API 令牌（由“zhiyi user add”或“zhiyi user token”生成），或打开“zhiyi serve”打印的链接。',
    'login.token': 'API 令牌',
    'login.submit': '登录',
    'login.failed': '链接中的令牌无效。请在下方粘贴有效的令牌。',
    'login.required': '请输入令牌。',
    'upload.title': '新建任务',
    'upload.drop': '把文档拖到这里，或选择文件',
    'upload.dropHint': '可一次选择多个文件，每个文件一个任务。',
    'upload.accepts': '支持：{list}',
    'upload.selected': '已选文件',
    'upload.remove': '移除 {name}',
    'upload.none': '尚未选择文件。',
    'upload.type': '任务类型',
    'upload.cost': '费用：{rule}',
    'upload.submit': '开始',
    'upload.submitting': '正在上传 {name}…',
    'upload.created': '已为 {name} 创建任务 #{id}：{cost} 积分。',
    'upload.createdMemory': '已为 {name} 创建任务 #{id}：{cost} 积分（{total} 段中 {n} 段来自翻译记忆）。',
    'upload.quote': '报价',
    'upload.quoting': '正在计算 {name} 的费用…',
    'upload.quoted': '{name}：{cost} 积分',
    'upload.quotedMemory': '{name}：{cost} 积分；{total} 段中 {n} 段来自翻译记忆，不发送也不收费',
    'glossary.none': '（不用术语表）',
    'glossary.option': '{name}（{source} → {target}，{terms} 条）',
    'engine.pairs': '{name}（{pairs}）',
    'param.glossary': '术语表',
    'param.memory': '翻译记忆',
    'upload.chooseFile': '请至少选择一个文件。',
    'upload.fileError': '{name}：{message}',
    'engine.unavailable': '{name}（不可用：{reason}）',
    'param.targetLang': '目标语言',
    'param.sourceLang': '源语言',
    'param.engine': '翻译引擎',
    'tasks.title': '任务',
    'tasks.empty': '还没有任务。上传文档即可开始。',
    'tasks.more': '加载更多',
    'tasks.loading': '加载中…',
    'task.cancel': '取消',
    'task.retry': '重试',
    'task.delete': '删除',
    'task.confirmDelete': '确定删除？',
    'task.download': '下载',
    'task.expired': '结果已超过保留期限并被删除。',
    'task.cost': '{n} 积分',
    'task.created': '创建于 {time}',
    'task.completed': '结束于 {time}',
    'task.eta': '约剩 {s} 秒',
    'task.attempt': '第 {n} 次尝试',
    'task.progressLabel': '{name} 的进度',
    'task.actions': '{name} 的操作',
    'status.pending': '等待中',
    'status.processing': '处理中',
    'status.completed': '已完成',
    'status.failed': '失败',
    'status.cancelled': '已取消',
    'stage.parsing': '解析',
    'stage.translating': '翻译',
    'stage.writing': '写入',
    'stage.extracting': '提取',
    'stage.submitting': '提交',
    'stage.waiting': '等待',
    'type.translate': '翻译',
    'type.analyze': '分析',
    'type.extract': '提取文本',
    'notify.title.completed': '任务已完成',
    'notify.title.failed': '任务失败',
    'notify.title.cancelled': '任务已取消',
    'error.network_error': '无法连接服务器，请确认它正在运行。',
    'error.unauthenticated': '您已退出登录，请重新登录。',
  },
};

const STORAGE_KEY = 'zhiyi-lang';
const listeners = new Set();
let lang = initialLang();

function initialLang() {
  let saved = null;
  try {
    saved = localStorage.getItem(STORAGE_KEY);
  } catch {
    // Storage can be disabled; the browser language is then enough.
  }
  if (saved && saved in STRINGS) return saved;
  return (navigator.language || 'en').toLowerCase().startsWith('zh') ? 'zh' : 'en';
}

/** The current language code, `zh` or `en`. */
export function getLang() {
  return lang;
}

/** Whether the dictionary has a string for `key`. */
export function has(key) {
  return key in STRINGS[lang];
}

/** The string for `key` with `{name}` placeholders filled from `vars`. */
export function t(key, vars = {}) {
  const template = STRINGS[lang][key] ?? STRINGS.en[key] ?? key;
  return template.replace(/\{(\w+)\}/g, (whole, name) => (name in vars ? String(vars[name]) : whole));
}

/** Switch language, remember it, re-label the static page and tell the listeners. */
export function setLang(next) {
  if (!(next in STRINGS) || next === lang) return;
  lang = next;
  try {
    localStorage.setItem(STORAGE_KEY, next);
  } catch {
    // Not remembered; still switched for this page.
  }
  applyStatic(document);
  for (const fn of listeners) fn(lang);
}

/** Call `fn(lang)` after every language switch. */
export function onLangChange(fn) {
  listeners.add(fn);
}

/** Fill elements marked `data-i18n` (text) and `data-i18n-<attr>` (attributes). */
export function applyStatic(root) {
  document.documentElement.lang = lang === 'zh' ? 'zh-CN' : 'en';
  document.title = t('app.title');
  for (const el of root.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const attr of ['aria-label', 'placeholder', 'title']) {
    const data = `i18n${attr.replace(/(^|-)(\w)/g, (_, __, c) => c.toUpperCase())}`;
    for (const el of root.querySelectorAll(`[data-i18n-${attr}]`)) {
      el.setAttribute(attr, t(el.dataset[data]));
    }
  }
}

/** A date in the current language's format. */
export function formatTime(iso) {
  if (!iso) return '';
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(lang === 'zh' ? 'zh-CN' : 'en', {
    dateStyle: 'short',
    timeStyle: 'medium',
  });
}
