/* A stand-in for Windows' bcryptprimitives.dll, for running Rust programs under Wine 8.
 *
 * Rust's std (1.78 and later) gets its random bytes (HashMap seeds) from ProcessPrng in
 * bcryptprimitives.dll, which Windows 10 and later have but Wine only gained in 9.x: under
 * Debian 12's wine 8.0 every Rust executable fails to start ("Library bcryptprimitives.dll ...
 * not found", status c0000135). This DLL exports ProcessPrng and fills the buffer from
 * RtlGenRandom (advapi32's SystemFunction036, which Wine has). It is built and installed by
 * .ci/windows.sh into the Wine prefix only; it is never shipped and real Windows never sees it.
 */
#include <windows.h>

#define RtlGenRandom SystemFunction036
BOOLEAN WINAPI RtlGenRandom(PVOID buffer, ULONG length);

/* Windows documents ProcessPrng as always returning TRUE; std aborts otherwise. */
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!RtlGenRandom(data, n))
            return FALSE;
        data += n;
        len -= n;
    }
    return TRUE;
}
