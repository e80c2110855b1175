//! The Lua scripts that change the directory: each check-and-write runs atomically in
//! Redis, and publishes its notice in the same step, so no relay sees a change without its
//! notice or a notice without its change.
//!
//! Values are `instance epoch run` (see `notice::Held`); the `relays` set of a name is a
//! hint of where its attachments may be, pruned whenever a script finds a member whose
//! attachment key has expired.

use std::sync::LazyLock;

use redis::Script;

/// Claims a name for an instance on this relay, and writes or refreshes its attachment.
///
/// KEYS: owner, attachment (this relay), relays set.
/// ARGV: relay, instance, epoch, run, lease ms, channel, attachment key prefix, name.
///
/// Returns `{1, relay}` when granted (also when only refreshed), `{0, holder}` when another
/// instance holds a live attachment on another relay, `{-1, relay}` when this relay has
/// already claimed the name for a newer epoch of the same run (a stale claim). The owner
/// of a name whose attachments have all lapsed, or whose only attachment is this relay's
/// (the local registry has just replaced it), is overwritten. The `attach` notice is
/// published only when the attachment changed, so refreshes are silent.
pub(super) static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_LUA));

/// The source of [`CLAIM`] (loaded with `SCRIPT LOAD` ahead of pipelined calls).
pub(super) const CLAIM_LUA: &str = r"
local me, instance, epoch, run, lease = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= instance then
  for _, relay in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    if relay ~= me then
      local held = redis.call('GET', ARGV[7] .. relay)
      if not held then
        redis.call('SREM', KEYS[3], relay)
      elseif string.match(held, '^(%S+)') == owner then
        return {0, relay}
      end
    end
  end
end
local value = instance .. ' ' .. ARGV[3] .. ' ' .. run
local current = redis.call('GET', KEYS[2])
if current and current ~= value then
  local _, held_epoch, held_run = string.match(current, '^(%S+) (%d+) (%S+)$')
  if held_run == run and tonumber(held_epoch) > epoch then
    return {-1, me}
  end
end
redis.call('SET', KEYS[2], value, 'PX', lease)
redis.call('SET', KEYS[1], instance, 'PX', lease)
redis.call('SADD', KEYS[3], me)
redis.call('PEXPIRE', KEYS[3], lease)
if current ~= value then
  redis.call('PUBLISH', ARGV[6], 'attach ' .. ARGV[8] .. ' ' .. me .. ' ' .. value)
end
return {1, me}
";

/// Removes this relay's attachment if it still holds exactly `value` (compare-and-delete:
/// a stale session's release never removes a newer attachment), and the owner if no
/// attachment of that instance remains anywhere.
///
/// KEYS: owner, attachment (this relay), relays set.
/// ARGV: relay, value, channel, attachment key prefix, name.
///
/// Returns 1 if it removed the attachment, 0 if the key held something else (or nothing).
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));

/// The source of [`RELEASE`].
pub(super) const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
local instance = string.match(ARGV[2], '^(%S+)')
local remains = false
for _, relay in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local held = redis.call('GET', ARGV[4] .. relay)
  if not held then
    redis.call('SREM', KEYS[3], relay)
  elseif string.match(held, '^(%S+)') == instance then
    remains = true
  end
end
if not remains and redis.call('GET', KEYS[1]) == instance then
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[3], 'detach ' .. ARGV[5] .. ' ' .. ARGV[1] .. ' ' .. ARGV[2])
return 1
";
