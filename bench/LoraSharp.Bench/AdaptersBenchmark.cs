using System.Diagnostics;
using System.Globalization;
using LoraSharp.Adapters;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Bench;

/// <summary>
/// Overhead of the adapter engine, measured side by side in one run (interleaved repetitions, medians):
/// (1) train step (forward + backward) of a LLaMA-shaped block stack (hidden 1024, MLP 2816, 1024 tokens, fp32) with
/// LoRA r=16 on every Linear, unmerged (hooks), vs the same stack without adapters (base frozen, input gradient on:
/// the backward work a LoRA step needs anyway) — target ≤ 1.15;
/// (2) inference forward with the LoRA merged vs the plain base — target ≤ 1.02;
/// (3) merge + unmerge of 100 Linear 1024×1024 layers with LoRA r=16 (first merge computes ΔW; a re-merge after a
/// multiplier change reuses the fp32 cache), relative to one forward pass of those 100 layers at 1024 tokens.
/// Ratios are of medians; "best-of" ratios (fastest run each) are printed too, as they are less sensitive to other
/// load on a shared machine. Options: --reps N (default 5), --blocks N (default 1), --tokens N (default 1024), --layers N (default 100), --threads N,
/// --copy-accumulation (unmerged inference adds into a copy of the base output instead of in place, to compare).
/// </summary>
public static class AdaptersBenchmark
{
    sealed class Block : nn.Module<Tensor, Tensor>
    {
        readonly Linear q, k, v, o, gate, up, down;

        public Block(long hidden, long mlp) : base("block")
        {
            q = nn.Linear(hidden, hidden, hasBias: false); k = nn.Linear(hidden, hidden, hasBias: false);
            v = nn.Linear(hidden, hidden, hasBias: false); o = nn.Linear(hidden, hidden, hasBias: false);
            gate = nn.Linear(hidden, mlp, hasBias: false); up = nn.Linear(hidden, mlp, hasBias: false); down = nn.Linear(mlp, hidden, hasBias: false);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            // attention-free stand-in: the same Linear shapes and data flow as a LLaMA block
            var h = x.add(o.call(q.call(x).add(k.call(x)).mul(sigmoid(v.call(x)))));
            return h.add(down.call(nn.functional.silu(gate.call(h)).mul(up.call(h)))).MoveToOuterDisposeScope();
        }
    }

    sealed class Stack : nn.Module<Tensor, Tensor>
    {
        readonly ModuleList<nn.Module<Tensor, Tensor>> layers = new();

        public Stack(IEnumerable<nn.Module<Tensor, Tensor>> items) : base("stack")
        {
            foreach (var m in items) layers.Add(m);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            foreach (var l in layers) x = l.call(x);
            return x.MoveToOuterDisposeScope();
        }
    }

    static int Opt(string[] args, string name, int dflt)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? int.Parse(args[i + 1], CultureInfo.InvariantCulture) : dflt;
    }

    static double Median(List<double> xs)
    {
        var s = xs.OrderBy(x => x).ToList();
        return s.Count % 2 == 1 ? s[s.Count / 2] : (s[s.Count / 2 - 1] + s[s.Count / 2]) / 2;
    }

    static double Time(Action a)
    {
        GC.Collect();
        var sw = Stopwatch.StartNew();
        a();
        return sw.Elapsed.TotalMilliseconds;
    }

    public static int Run(string[] args)
    {
        int reps = Opt(args, "--reps", 5), blocks = Opt(args, "--blocks", 1), tokens = Opt(args, "--tokens", 1024), layers = Opt(args, "--layers", 100);
        int threads = Opt(args, "--threads", 0);
        if (threads > 0) set_num_threads(threads);
        const long hidden = 1024, mlp = 2816;
        Console.WriteLine($"adapters benchmark: {blocks} LLaMA-shaped block(s) (hidden {hidden}, MLP {mlp}), {tokens} tokens, fp32, {get_num_threads()} threads, {reps} interleaved reps");

        manual_seed(0);
        var baseModel = new Stack(Enumerable.Range(0, blocks).Select(_ => (nn.Module<Tensor, Tensor>)new Block(hidden, mlp)));
        var loraModel = new Stack(Enumerable.Range(0, blocks).Select(_ => (nn.Module<Tensor, Tensor>)new Block(hidden, mlp)));
        using (no_grad())
            foreach (var ((_, pb), (_, pl)) in baseModel.named_parameters().Zip(loraModel.named_parameters())) pl.copy_(pb);
        foreach (var p in baseModel.parameters()) p.requires_grad = false;
        using var host = new AdapterHost(loraModel) { InPlaceAccumulation = !args.Contains("--copy-accumulation") };
        host.FreezeBase();
        var lora = host.Create("lora", new AdapterConfig { Rank = 16, Alpha = 16 }, ModuleSelector.All());
        using (no_grad()) foreach (var p in host.TrainableParameters()) p.normal_(0, 0.01); // non-zero up: real work
        Console.WriteLine($"  LoRA on {lora.Modules.Count} Linear modules, {host.TrainableParameters().Sum(p => p.numel()):N0} trainable parameters, unmerged inference accumulates {(host.InPlaceAccumulation ? "in place" : "into a copy")}");
        var x = randn(1, tokens, hidden);

        void TrainStep(nn.Module<Tensor, Tensor> m)
        {
            using var scope = NewDisposeScope();
            var xi = x.detach().requires_grad_(true);
            m.call(xi).square().mean().backward();
        }
        void Infer(nn.Module<Tensor, Tensor> m)
        {
            using var scope = NewDisposeScope();
            using var _ = no_grad();
            m.call(x);
        }

        // (1) train step, unmerged LoRA vs base
        TrainStep(baseModel); TrainStep(loraModel);
        var tBase = new List<double>(); var tLora = new List<double>();
        for (int r = 0; r < reps; r++)
        {
            tBase.Add(Time(() => TrainStep(baseModel)));
            tLora.Add(Time(() => TrainStep(loraModel)));
        }
        foreach (var p in host.TrainableParameters()) p.grad?.zero_();
        double trainRatio = Median(tLora) / Median(tBase);
        Console.WriteLine($"  train step  base {Median(tBase),8:F1} ms   LoRA unmerged {Median(tLora),8:F1} ms   ratio {trainRatio:F3} (target <= 1.15; best-of ratio {tLora.Min() / tBase.Min():F3})");

        // (1b) inference unmerged, for reference
        var iBase = new List<double>(); var iUnmerged = new List<double>(); var iMerged = new List<double>();
        Infer(baseModel); Infer(loraModel);
        for (int r = 0; r < reps; r++)
        {
            iBase.Add(Time(() => Infer(baseModel)));
            iUnmerged.Add(Time(() => Infer(loraModel)));
        }
        // (2) merged inference vs base
        host.Merge();
        Infer(loraModel);
        var iBase2 = new List<double>();
        for (int r = 0; r < reps; r++)
        {
            iBase2.Add(Time(() => Infer(baseModel)));
            iMerged.Add(Time(() => Infer(loraModel)));
        }
        host.Unmerge();
        double mergedRatio = Median(iMerged) / Median(iBase2);
        Console.WriteLine($"  inference   base {Median(iBase),8:F1} ms   LoRA unmerged {Median(iUnmerged),8:F1} ms   ratio {Median(iUnmerged) / Median(iBase):F3} (best-of {iUnmerged.Min() / iBase.Min():F3})");
        Console.WriteLine($"  inference   base {Median(iBase2),8:F1} ms   LoRA merged   {Median(iMerged),8:F1} ms   ratio {mergedRatio:F3} (target <= 1.02; best-of {iMerged.Min() / iBase2.Min():F3})");
        host.Dispose();
        baseModel.Dispose(); loraModel.Dispose();

        // (3) merge + unmerge of N layers 1024×1024
        manual_seed(1);
        var stack = new Stack(Enumerable.Range(0, layers).Select(_ => (nn.Module<Tensor, Tensor>)nn.Linear(hidden, hidden, hasBias: false)));
        foreach (var p in stack.parameters()) p.requires_grad = false;
        using var host2 = new AdapterHost(stack);
        var l2 = host2.Create("lora", new AdapterConfig { Rank = 16, Alpha = 16 }, ModuleSelector.All());
        using (no_grad()) foreach (var p in host2.TrainableParameters()) p.normal_(0, 0.01);
        l2.Enabled = false;
        Infer(stack);
        var fwd = new List<double>(); var firstMerge = new List<double>(); var remerge = new List<double>(); var unmerge = new List<double>();
        for (int r = 0; r < Math.Max(3, reps / 2); r++)
        {
            fwd.Add(Time(() => Infer(stack)));
            l2.Enabled = true;
            host2.InvalidateCache();
            firstMerge.Add(Time(host2.Merge));
            remerge.Add(Time(() => { l2.Multiplier = l2.Multiplier == 1 ? 0.5 : 1; host2.ApplyPending(); }));
            unmerge.Add(Time(host2.Unmerge));
            l2.Enabled = false;
        }
        double f = Median(fwd), mu = Median(firstMerge) + Median(unmerge);
        Console.WriteLine($"  {layers} layers {hidden}x{hidden}: one forward ({tokens} tokens) {f,8:F1} ms");
        Console.WriteLine($"    merge (computes ΔW) {Median(firstMerge),8:F1} ms + unmerge {Median(unmerge),6:F1} ms = {mu:F1} ms = {mu / f:F3} forward passes");
        Console.WriteLine($"    re-merge after a multiplier change (cached ΔW) {Median(remerge),8:F1} ms = {Median(remerge) / f:F3} forward passes");
        return 0;
    }
}
