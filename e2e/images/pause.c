/* The pause container of the local node: holds the pod sandbox's namespaces, reaps orphans, and
 * exits on SIGTERM/SIGINT. Built with `gcc -static` by the harness (e2e/src/images.rs). */
#include <signal.h>
#include <unistd.h>
#include <stdlib.h>
#include <sys/wait.h>
static void quit(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, 0, 1) > 0) {} }
int main(void) {
  signal(SIGINT, quit); signal(SIGTERM, quit); signal(SIGCHLD, reap);
  for (;;) pause();
}
