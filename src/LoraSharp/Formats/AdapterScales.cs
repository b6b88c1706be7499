using LoraSharp.Adapters;

namespace LoraSharp.Formats;

/// <summary>The rank and effective scale of one module's weights under its file's conventions.</summary>
public static class AdapterScales
{
    /// <summary>The r of alpha/r (0 when nothing is decomposed, e.g. LoKr with two full factors under LyCORIS rules).</summary>
    public static int RankFor(ModuleAdapterWeights m) => (int)(m.Rank ?? AdapterFile.RankOf(m.Algorithm, m.Tensors));

    /// <summary>
    /// alpha/r (alpha/√r for rsLoRA); alpha missing → 1; LoKr with neither factor decomposed → 1 under LyCORIS
    /// rules, alpha/r (config r) under PEFT rules; full diffs → 1.
    /// </summary>
    public static double Scale(ModuleAdapterWeights m)
    {
        if (m.Algorithm == AdapterAlgorithm.Full) return 1;
        int r = RankFor(m);
        if (r == 0) return 1;
        double alpha = m.Alpha ?? r;
        return m.RsLora ? alpha / Math.Sqrt(r) : alpha / r;
    }
}
