/* smoe_status_string: every status has its own phrase (the torch binding puts it in its error
 * messages), and a value outside the enum still gives a string. */
#include "harness.h"

int main(void) {
  const smoe_status all[4] = {SMOE_OK, SMOE_ERR_ARG, SMOE_ERR_ALLOC, SMOE_ERR_DEVICE};
  const char *want[4] = {"ok", "invalid argument", "out of memory", "CUDA"};
  for (int i = 0; i < 4; ++i) {
    const char *text = smoe_status_string(all[i]);
    CHECK(text && strstr(text, want[i]), "status %d: got \"%s\", want a phrase with \"%s\"", (int)all[i],
          text ? text : "(null)", want[i]);
    for (int j = 0; j < i; ++j)
      CHECK(strcmp(text, smoe_status_string(all[j])) != 0, "statuses %d and %d share the phrase \"%s\"", i, j, text);
  }
  const char *unknown = smoe_status_string((smoe_status)99);
  CHECK(unknown && strcmp(unknown, "unknown status") == 0, "status 99: got \"%s\"", unknown ? unknown : "(null)");
  return harness_summary();
}
