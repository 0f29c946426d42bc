/**
 * Credentials out of everything the process prints or hands out: the one place that
 * knows what a secret in a location looks like. Error messages and fields, backends'
 * `location`, check reports and everything the CLI writes pass through redactCredentials.
 *
 * What goes, and what takes its place:
 * - The password of a URL's user part, whatever the scheme: `scheme://user:pw@` and
 *   libiscsi's `scheme://user%pw@` become `scheme://user@`. Dropped, not masked: the URL
 *   stays one the drivers accept, the password then coming from where it belongs (iSCSI:
 *   LIBISCSI_CHAP_PASSWORD or a password file). The user name stays: operators need it.
 * - The value of a secret query parameter becomes `***` (REDACTED): an empty value would
 *   read as an empty password. Secret parameters are those drivers declare
 *   (ProtocolDriver.secretParameters) and any whose name contains one of GENERIC_SECRET_WORDS.
 * - Both also inside a percent-encoded URL (`iscsi%3A%2F%2Fuser%25pw%40host`, a URL
 *   carried in a parameter of another).
 * - A secret once seen (MIN_SCANNED_SECRET characters or more) becomes `***` wherever
 *   else it shows up: native libraries quote pieces of a URL in shapes of their own
 *   (libnfs: "Invalid address:user:pw@127.0.0.1").
 * Plain paths are not parsed (`/a/b:c@d?password=x` is a file name): only what follows
 * `scheme://` is read as a URL; a known secret is masked in them all the same.
 */

/** What a secret parameter's value, or a known secret found in free text, is replaced with. */
export const REDACTED = '***';

/** Query parameters whose name contains one of these are secret whoever declared them. */
export const GENERIC_SECRET_WORDS: readonly string[] = ['password', 'passwd', 'pwd', 'secret', 'token', 'credential'];

/**
 * Shorter secrets are not searched for in free text: they would mask unrelated text
 * (offsets, sizes, words), and hiding so short a password protects little anyway.
 */
export const MIN_SCANNED_SECRET = 6;

/** Known secrets kept for scanning, at most; the oldest go first. */
const MAX_SECRETS = 256;

interface RedactionState {
  readonly parameters: Set<string>;
  readonly secrets: Set<string>;
  /** `secrets`, longest first: a secret that contains another is masked whole. */
  scanOrder: string[];
}

/**
 * Process-wide, and shared by every copy of this module in the process (the CLI's
 * bundle, an embedder's own copy, the testkit's), as BlockError's brand is: a secret is
 * a secret whichever driver declared it, and locations are printed where no driver is
 * at hand (a CLI message, a backing file name of another scheme). Masking a harmless
 * parameter of another scheme that shares a secret one's name costs only its value.
 */
const STATE_KEY = Symbol.for('@blockconv/core.redaction');
const state = ((globalThis as Record<symbol, unknown>)[STATE_KEY] ??= {
  parameters: new Set<string>(),
  secrets: new Set<string>(),
  scanOrder: [],
}) as RedactionState;

/** Declares query parameter names (any case) whose values are secrets in every URL from now on. */
export function declareSecretParameters(names: readonly string[]): void {
  for (const n of names) state.parameters.add(n.toLowerCase());
}

export function isSecretParameter(name: string): boolean {
  const n = safeDecode(name).toLowerCase();
  return state.parameters.has(n) || GENERIC_SECRET_WORDS.some((w) => n.includes(w));
}

/**
 * A secret obtained some other way than in a URL (a CHAP password from the environment
 * or a file), to be masked wherever it appears from now on (if long enough to scan).
 */
export function registerSecret(secret: string): void {
  for (const s of new Set([secret, safeDecode(secret)])) {
    if (s.length < MIN_SCANNED_SECRET || state.secrets.has(s)) continue;
    if (state.secrets.size >= MAX_SECRETS) state.secrets.delete(state.secrets.values().next().value!);
    state.secrets.add(s);
    state.scanOrder = [...state.secrets].sort((a, b) => b.length - a.length);
  }
}

/** How a URL's structure is written: plainly, or percent-encoded as a whole. */
interface UrlSyntax {
  /** `scheme://`, then the authority up to its last `@`: the user part. */
  readonly userinfo: RegExp;
  /** Splits the user name from the password. */
  readonly userSeparator: RegExp;
  /** A query parameter: separator, name, `=`, value. */
  readonly parameter: RegExp;
}

const PLAIN: UrlSyntax = {
  userinfo: /([a-z][a-z0-9+.-]*:\/\/)([^\s/?#"'<>]*)@/gi,
  userSeparator: /[:%]/,
  parameter: /([?&;])([^=&;#\s"'<>/]+)=([^&;#\s"'<>]*)/g,
};

/** The same with `:/?#@&;=%` written %3A %2F %3F %23 %40 %26 %3B %3D %25. */
const ENCODED: UrlSyntax = {
  userinfo: /([a-z][a-z0-9+.-]*%3a%2f%2f)((?:(?!%2f|%3f|%23)[^\s/?#"'<>])*)%40/gi,
  userSeparator: /%3a|%25/i,
  parameter: /(%3f|%26|%3b)((?:(?!%3d|%26|%3b|%23)[^\s=&;#"'<>/])+)%3d((?:(?!%26|%3b|%23)[^\s&;#"'<>])*)/gi,
};

/** Where a URL is: its `://` (plain or encoded); the URL is the word around it. */
const URL_MARK = /:\/\/|%3a%2f%2f/gi;
/** What ends a word: URLs in messages and JSON sit between spaces (or controls) or quotes. */
function endsWord(code: number): boolean {
  return code <= 0x20 || code === 0x22 || code === 0x27 || code === 0x3c || code === 0x3e || code === 0xa0;
}

/**
 * Text fit to print: the password of every URL in it dropped, secret parameters and
 * known secrets masked (see the module comment). Secrets found are remembered, so
 * that later text quoting them some other way is masked too.
 */
export function redactCredentials(text: string): string {
  // Lines of output repeat one location (map's File column): each is redacted once.
  const done = new Map<string, string>();
  let out = mapUrlWords(text, (word) => {
    let shown = done.get(word);
    if (shown === undefined) done.set(word, (shown = redactUrl(redactUrl(word, PLAIN), ENCODED)));
    return shown;
  });
  for (const s of state.scanOrder) if (out.includes(s)) out = out.split(s).join(REDACTED);
  return out;
}

/**
 * `text` with each word that holds a URL replaced by `f(word)`. Only those words are
 * visited: the CLI's output (a map of a million extents) passes through here.
 */
function mapUrlWords(text: string, f: (word: string) => string): string {
  let out = '';
  let done = 0;
  URL_MARK.lastIndex = 0;
  for (let m = URL_MARK.exec(text); m; m = URL_MARK.exec(text)) {
    let start = m.index;
    while (start > done && !endsWord(text.charCodeAt(start - 1))) start--;
    let end = m.index + m[0].length;
    while (end < text.length && !endsWord(text.charCodeAt(end))) end++;
    out += text.slice(done, start) + f(text.slice(start, end));
    done = end;
    URL_MARK.lastIndex = end;
  }
  return done === 0 ? text : out + text.slice(done);
}

/** A location's own user part: in a location alone, quotes and spaces may be part of a password. */
const LOCATION_USERINFO = /^([a-z][a-z0-9+.-]*:\/\/)([^/?#]*)@/i;

/**
 * A location fit to print (BlockBackend.location, messages, JSON): redactCredentials,
 * after the location's own password is dropped whatever characters it holds.
 */
export function redactLocation(location: string): string {
  return redactCredentials(
    location.replace(LOCATION_USERINFO, (m, scheme: string, userinfo: string) =>
      dropPassword(m, scheme, userinfo, PLAIN),
    ),
  );
}

function redactUrl(url: string, syntax: UrlSyntax): string {
  return url
    .replace(syntax.userinfo, (m, scheme: string, userinfo: string) => dropPassword(m, scheme, userinfo, syntax))
    .replace(syntax.parameter, (m, sep: string, name: string, value: string) => {
      if (!value || value === REDACTED || !isSecretParameter(name)) return m;
      registerSecret(value);
      return `${sep}${name}${syntax === PLAIN ? '=' : '%3D'}${REDACTED}`;
    });
}

/** `scheme://user@` for `scheme://user:password@` (or `%password`); the password is remembered. */
function dropPassword(match: string, scheme: string, userinfo: string, syntax: UrlSyntax): string {
  const sep = syntax.userSeparator.exec(userinfo);
  if (!sep) return match;
  registerSecret(userinfo.slice(sep.index + sep[0].length));
  return `${scheme}${userinfo.slice(0, sep.index)}${syntax === PLAIN ? '@' : '%40'}`;
}

function safeDecode(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}
