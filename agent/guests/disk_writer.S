/*
 * Disk writer: the guest-disk test guest. Loaded at 0x7c00 like the A-B sweeper, it
 * enters 32-bit protected mode, asks block device 0 (ports 0x510..0x52f, see
 * agent/src/devices/block.rs) for its capacity (IDENTIFY), prints 'A' on COM1, then
 * loops forever:
 *
 *   1. builds record `seq` (seqs start at last_acked + 1) in a 512-byte buffer at
 *      0x10000 and WRITEs it to sector seq % nsectors, nsectors = min(capacity, 2048)
 *      (the first 1 MiB of the disk), polling STATUS until it is no longer busy;
 *   2. on error prints 'E', waits a moment and writes the same record again (the
 *      acked counter never moves on an error);
 *   3. on ok stores seq as the last acknowledged record, a u64 at 0x500, and prints
 *      'W' every 4096 records;
 *   4. increments the first byte of the next 256 pages of 1 MiB..100 MiB (wrapping),
 *      so guest RAM also passes agent::guests::check_ab_ram.
 *
 * Record layout (u32 words, little endian): 0 "SHDW", 1 zero, 2-3 seq (u64), 4-5
 * sector (u64), 6..126 filler (seq * 0x9E3779B1 + word index, mod 2^32), 126 the
 * wrapping sum of words 0..126, 127 their xor. agent::guests::check_disk_records
 * checks what lands on the disk. seq is 32 bits wide here (its high word is 0).
 */
        .set START_ADDR, 0x100000
        .set END_ADDR,   0x6400000
        .set COM1,       0x3f8
        .set BLK,        0x510
        .set ACKED,      0x500
        .set NSECTORS,   0x600
        .set BUF,        0x10000
        .set MAX_SECTORS, 2048
        .set CMD_WRITE,  2
        .set CMD_IDENTIFY, 4
        .set ST_BUSY,    1
        .set ST_OK,      2

        .code16
        .text
        .globl _start
_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %ss
        mov     $0x7c00, %sp

        /* Fast A20: set bit 1 of port 0x92, never bit 0 (that would reset). */
        inb     $0x92, %al
        or      $0x02, %al
        and     $0xfe, %al
        outb    %al, $0x92

        lgdtl   gdt_desc
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $0x08, $protected

        .code32
protected:
        mov     $0x10, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %fs
        mov     %eax, %gs
        mov     %eax, %ss
        mov     $0x7c00, %esp

identify:
        mov     $CMD_IDENTIFY, %eax
        call    disk_cmd
        cmp     $ST_OK, %eax
        jne     identify_failed
        mov     $BLK + 4, %dx           /* CAPACITY_HI */
        inl     %dx, %eax
        test    %eax, %eax
        jnz     big
        mov     $BLK, %dx               /* CAPACITY_LO */
        inl     %dx, %eax
        cmp     $MAX_SECTORS, %eax
        jbe     sized
big:
        mov     $MAX_SECTORS, %eax
sized:
        test    %eax, %eax
        jz      identify_failed
        mov     %eax, NSECTORS

        mov     $'A', %al
        call    putc

        mov     ACKED, %esi
        inc     %esi                    /* esi: the record to write */
        mov     $START_ADDR, %ebp       /* ebp: the next page to sweep */

record:
        mov     %esi, %eax
        xor     %edx, %edx
        divl    NSECTORS
        mov     %edx, %ebx              /* ebx: its sector */
        call    build

write:
        mov     $BLK + 0x08, %dx        /* SECTOR_LO */
        mov     %ebx, %eax
        outl    %eax, %dx
        xor     %eax, %eax
        add     $4, %dx                 /* SECTOR_HI */
        outl    %eax, %dx
        add     $8, %dx                 /* ADDR_HI */
        outl    %eax, %dx
        sub     $4, %dx                 /* ADDR_LO */
        mov     $BUF, %eax
        outl    %eax, %dx
        add     $8, %dx                 /* LENGTH */
        mov     $512, %eax
        outl    %eax, %dx
        mov     $CMD_WRITE, %eax
        call    disk_cmd
        cmp     $ST_OK, %eax
        je      acked
        mov     $'E', %al
        call    putc
        call    delay
        jmp     write                   /* the same record again */

acked:
        mov     %esi, ACKED
        movl    $0, ACKED + 4
        test    $0xfff, %esi
        jnz     sweep
        mov     $'W', %al
        call    putc

sweep:
        mov     $256, %ecx
1:
        incb    (%ebp)
        add     $0x1000, %ebp
        cmp     $END_ADDR, %ebp
        jb      2f
        mov     $START_ADDR, %ebp
2:
        loop    1b

        inc     %esi
        jmp     record

identify_failed:
        mov     $'E', %al
        call    putc
        call    delay
        jmp     identify

/* Builds record esi for sector ebx at BUF. Clobbers eax, ecx, edx, edi. */
build:
        mov     $BUF, %edi
        movl    $0x57444853, (%edi)     /* "SHDW" */
        movl    $0, 4(%edi)
        mov     %esi, 8(%edi)
        movl    $0, 12(%edi)
        mov     %ebx, 16(%edi)
        movl    $0, 20(%edi)
        mov     %esi, %eax
        imul    $0x9E3779B1, %eax, %eax
        mov     $6, %ecx
1:
        lea     (%eax,%ecx), %edx
        mov     %edx, (%edi,%ecx,4)
        inc     %ecx
        cmp     $126, %ecx
        jb      1b
        xor     %eax, %eax              /* sum */
        xor     %edx, %edx              /* xor */
        xor     %ecx, %ecx
1:
        add     (%edi,%ecx,4), %eax
        xor     (%edi,%ecx,4), %edx
        inc     %ecx
        cmp     $126, %ecx
        jb      1b
        mov     %eax, 504(%edi)
        mov     %edx, 508(%edi)
        ret

/* Writes command eax and waits until STATUS is not busy; returns it in eax. */
disk_cmd:
        mov     $BLK + 0x1c, %dx
        outl    %eax, %dx
1:
        inl     %dx, %eax
        cmp     $ST_BUSY, %eax
        jne     2f
        pause
        jmp     1b
2:
        ret

/* Prints al on COM1. Clobbers dx. */
putc:
        mov     $COM1, %dx
        outb    %al, %dx
        ret

/* Waits a moment (about 20000 port writes to the POST port). Clobbers ecx. */
delay:
        mov     $20000, %ecx
1:
        outb    %al, $0x80
        loop    1b
        ret

        .p2align 3
gdt:
        .quad   0                       /* null */
        .quad   0x00cf9a000000ffff      /* 0x08: code, base 0, 4 GiB, 32-bit */
        .quad   0x00cf92000000ffff      /* 0x10: data, base 0, 4 GiB, 32-bit */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
